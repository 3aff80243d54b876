//! The builder's `[[container_images]] pull` against a real registry on the
//! host's loopback (Debian's `docker-registry`, started per test): an image
//! pushed there is pulled back by digest into the stage cache; a second build
//! finds it in the cache without contacting the registry; a digest the
//! registry does not have, a registry that speaks plain HTTP without
//! `--insecure-registry`, and a wrong `image_id` pin each fail the build with
//! an error that says what to do. No VM: seconds. The QEMU proof that a
//! pulled image is loaded and run on a node is the cluster test's controller
//! image.
//!
//! Run: `cargo test --release -p qemu-tests --test registry_pull`
//! (needs skopeo and docker-registry: `builder/setup-host.sh --tests`).

use aiwimg::cache::Cache;
use aiwimg::profile::RegistryImage;
use aiwimg::stages::baked::inspect_archive;
use aiwimg::stages::registry::resolve;
use qemu_tests::docker_archive::{write_hello_image, HELLO_TAG};
use qemu_tests::local_registry::LocalRegistry;
use qemu_tests::test_images::qemu_tests_root;

fn image(pull: String, tag: Option<&str>, image_id: Option<String>) -> RegistryImage {
    RegistryImage {
        pull,
        tag: tag.map(String::from),
        image_id,
    }
}

#[test]
fn pulled_by_digest_cached_by_digest_and_refused_when_unpinned_or_wrong() {
    let root = qemu_tests_root().join("registry-pull");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let archive = root.join("hello.tar");
    write_hello_image(&archive).unwrap();
    let image_id = inspect_archive(&archive).unwrap().image_id;
    let cache = Cache::new(root.join("cache")).unwrap();

    let registry = LocalRegistry::start(&root.join("registry")).unwrap();
    let digest = registry.push_archive(&archive, HELLO_TAG).unwrap();
    let reference = format!("{}/{HELLO_TAG}@{digest}", registry.addr);
    let insecure = vec![registry.addr.clone()];

    // Plain HTTP is refused unless the build names the registry.
    let e = resolve(&cache, &[image(reference.clone(), None, None)], &[])
        .map(|_| ())
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("--insecure-registry"), "{e}");

    // A digest the registry does not have.
    let missing = format!("{}/{HELLO_TAG}@sha256:{}", registry.addr, "0".repeat(64));
    let e = resolve(&cache, &[image(missing, None, None)], &insecure)
        .map(|_| ())
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("skopeo could not pull") && e.contains("0000000000"),
        "{e}"
    );

    // A wrong image_id pin.
    let wrong = Some(format!("sha256:{}", "1".repeat(64)));
    let e = resolve(&cache, &[image(reference.clone(), None, wrong)], &insecure)
        .map(|_| ())
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("the profile pins image_id"),
        "{e:#}"
    );

    // The real thing: pulled, the archive has the pushed image under the node's name.
    let want = image(reference.clone(), Some(HELLO_TAG), Some(image_id.clone()));
    let (first, held) = resolve(&cache, std::slice::from_ref(&want), &insecure).unwrap();
    drop(held);
    assert_eq!(first.len(), 1);
    let a = inspect_archive(&first[0].archive).unwrap();
    assert_eq!(a.image_id, image_id, "the pulled image is the pushed one");
    assert_eq!(a.format, "docker-save");
    assert!(
        a.tags.iter().any(|t| t.ends_with(HELLO_TAG)),
        "tags {:?}",
        a.tags
    );
    assert_eq!(first[0].pulled_from.as_deref(), Some(reference.as_str()));
    assert_eq!(
        first[0].sha256,
        aiwimg::cache::sha256_file(&first[0].archive).unwrap()
    );
    println!(
        "pulled {reference}: archive sha256 {}, image {image_id}",
        first[0].sha256
    );

    // The registry gone: the same pin comes from the cache, byte for byte.
    drop(registry);
    let (again, _held) = resolve(&cache, &[want], &insecure).unwrap();
    assert_eq!(again, first);
    let _ = std::fs::remove_dir_all(&root);
}
