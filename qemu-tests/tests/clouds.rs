//! Issue 7, "cloud user-data at boot, proven in QEMU": the `engine` image
//! booted the way each platform launches it, finding its user-data the way it
//! would there, then joining the Edge API test controller.
//!
//! - EC2, GCE, Azure: TEST DOUBLES of their metadata services
//!   (`qemu_tests::cloud_doubles`) on 127.0.0.1, reached by the guest at
//!   169.254.169.254:80 through a QEMU guest forward on a `restrict=on` user
//!   network (never a real network); platform identity from `-smbios` with the
//!   DMI strings each cloud really shows.
//! - OpenStack: a `config-2` ISO; VMware: the OVF environment ISO (`OVF ENV`,
//!   `ovf-env.xml` with the OVA's `user-data` property, base64); NoCloud: a
//!   seed made by `cloud-localds`; bare metal: `aiware/user-data` written into
//!   the ESP of a copy of the raw image (as after flashing), no seed at all.
//! - Kernel command line: a systemd-boot entry added to the ESP of a flashed
//!   copy that starts the same UKI with `aiware.*` words added to its command
//!   line (see [`kernel_command_line`] for why this is the way).
//! - No user-data: an EC2 identity whose IMDS has none.
//!
//! Each test shows the datasource chosen and why (`aiw-agent status --json`),
//! that the node joined, and its boot-to-ready time. Where the platform has
//! metadata, the user-data carries no hostname or SSH key: the test logs in
//! with the key the platform gave and sees the platform's host name in
//! `hostnamectl` and in the controller's `GET /hosts`, and the instance type
//! there as `serverTypeName` ([`platform_facts_shown`], issue 13).
//!
//! Run: `cargo test --release -p qemu-tests --test clouds -- --test-threads=1 --nocapture`.

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::case::DEFAULT_BUDGET;
use qemu_tests::checks::agent_status;
use qemu_tests::cloud_doubles::{
    azure_net, base64, controller_url_link_local, metadata_net, Cloud, MetadataDouble, AZURE_VM_ID,
    EC2_INSTANCE_ID, GCE_INSTANCE_ID, WIRESERVER_INSTANCE_ID,
};
use qemu_tests::node::{
    controller_url_in_guest, node_vm, start_controller, wait_for_hosts, TEST_INIT_TOKEN,
    TEST_LICENSE,
};
use qemu_tests::process::{on_path, run_checked};
use qemu_tests::seed::make_iso;
use qemu_tests::test_images::{image_for, TestImage};
use qemu_tests::vm::VmBuilder;
use qemu_tests::{AgentReport, DiskFormat, DriveBus, ExtraDrive, TestCase, UserData, Vm};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn image() -> TestImage {
    image_for("engine").unwrap_or_else(|e| panic!("no engine image to boot: {e:#}"))
}

/// The guide's engine user-data joining the controller at `controller_url`,
/// with the test's SSH key so the test can ask the node.
fn joining(hostname: &str, controller_url: &str, ssh_key: &str) -> String {
    joining_data(hostname, controller_url, ssh_key).render()
}

/// [`joining`] before it is rendered.
fn joining_data(hostname: &str, controller_url: &str, ssh_key: &str) -> UserData {
    settings_only(controller_url)
        .hostname(hostname)
        .ssh_key(ssh_key)
}

/// The guide's engine settings alone, as a user launches on a platform that
/// names the instance and carries its key pair: no hostname, no SSH key.
fn settings_only(controller_url: &str) -> UserData {
    UserData::cloud_config()
        .setting("AIWARE_MODE", "engine")
        .setting("AIWARE_LICENSE", TEST_LICENSE)
        .setting("AIWARE_CONTROLLER", controller_url)
        .setting("AIWARE_INIT_TOKEN", TEST_INIT_TOKEN)
}

/// What the platform's metadata says of the instance, which the node must show.
struct PlatformFacts<'a> {
    hostname: &'a str,
    /// `None` where the platform has no instance types (config drive, OVF, NoCloud).
    instance_type: Option<&'a str>,
}

/// [`platform_facts_shown`] for what a metadata service double serves.
fn served_facts_shown(
    case: &TestCase,
    vm: &Vm,
    controller: &qemu_tests::edge_controller::EdgeTestController,
    double: &MetadataDouble,
) -> Result<()> {
    let f = double.instance_facts();
    platform_facts_shown(
        case,
        vm,
        controller,
        &PlatformFacts {
            hostname: &f.hostname,
            instance_type: Some(&f.instance_type),
        },
    )
}

/// Issue 13: with user-data that names neither, the platform's host name is
/// the node's (`hostnamectl`) and the controller's (`GET /hosts`), its
/// instance type reached the controller, and its SSH key let [`prove`] log in.
fn platform_facts_shown(
    case: &TestCase,
    vm: &Vm,
    controller: &qemu_tests::edge_controller::EdgeTestController,
    want: &PlatformFacts,
) -> Result<()> {
    let dl = case.deadline();
    let transient = vm.check("hostnamectl --transient hostname", dl)?;
    let listed = controller.list_hosts()?;
    let host = listed.first().context("GET /hosts lists no host")?;
    eprintln!(
        "clouds: {}: logged in with the platform's SSH key; hostnamectl: {}; GET /hosts: \
         hostname {} serverTypeName {} cloudProviderInstanceID {}",
        case.name(),
        transient.trim(),
        host["hostname"],
        host["serverTypeName"],
        host["cloudProviderInstanceID"]
    );
    ensure!(
        transient.trim() == want.hostname,
        "hostnamectl says {:?}, the platform named the instance {:?}",
        transient.trim(),
        want.hostname
    );
    ensure!(
        host["hostname"] == want.hostname,
        "GET /hosts: hostname {}, the platform's is {:?}",
        host["hostname"],
        want.hostname
    );
    if let Some(t) = want.instance_type {
        ensure!(
            host["serverTypeName"] == t,
            "GET /hosts: serverTypeName {}, the instance type is {t:?}",
            host["serverTypeName"]
        );
    }
    Ok(())
}

/// What the node says about its launch.
struct Proof {
    datasource: String,
    reason: String,
    host_id: String,
}

/// Boots to `ready`, then shows that `datasource` was chosen for the expected
/// reason and that the node joined `controller`.
fn prove(
    case: &TestCase,
    vm: &mut Vm,
    controller: &qemu_tests::edge_controller::EdgeTestController,
    datasource: &str,
    reason_has: &str,
) -> Result<Proof> {
    let dl = case.deadline();
    let took = vm.wait_ready(dl)?;
    case.timing("boot to ready", took);
    let hosts = wait_for_hosts(controller, 1, dl)?;
    vm.wait_ssh(dl)?;
    let status = agent_status(vm, dl)?;
    let proof = Proof {
        datasource: status["datasource"].as_str().unwrap_or("").to_string(),
        reason: status["datasource_reason"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        host_id: hosts[0].host_id.clone(),
    };
    eprintln!(
        "clouds: {}: datasource {} because {}; joined the test controller as {}; \
         join state {}; boot to ready {took:.1?}",
        case.name(),
        proof.datasource,
        proof.reason,
        proof.host_id,
        status["join"]["state"]
    );
    ensure!(
        proof.datasource == datasource,
        "expected datasource {datasource}, aiw-agent status says {:?} ({})",
        proof.datasource,
        proof.reason
    );
    ensure!(
        proof.reason.contains(reason_has),
        "datasource reason {:?} does not mention {reason_has:?}",
        proof.reason
    );
    ensure!(
        status["join"]["state"] == "joined",
        "join state: {}",
        status["join"]
    );
    ensure!(
        status["settings_valid"] == true,
        "settings not valid: {}",
        status["validation_errors"]
    );
    Ok(proof)
}

/// A VM on the link-local network with `double` at 169.254.169.254 and the
/// controller at 169.254.0.100:9000.
fn cloud_vm(
    case: &TestCase,
    image: &TestImage,
    name: &str,
    double: &MetadataDouble,
    controller_port: u16,
    smbios: &[&str],
) -> Result<VmBuilder> {
    let mut b = qemu_tests::Vm::builder(name, case.dir())
        .disk(&image.disk, image.format)
        .user_net(metadata_net(Some(double.port()), Some(controller_port))?);
    for s in smbios {
        b = b.smbios(s);
    }
    Ok(b)
}

/// Every answer the guest got with a 2xx carried the service's credential,
/// and the user-data itself was fetched.
fn credentials_were_used(double: &MetadataDouble, user_data_path: &str) -> Result<()> {
    let seen = double.seen();
    eprintln!(
        "clouds: {:?} metadata double saw:\n{}",
        double.cloud(),
        double.log()
    );
    if let Some(s) = seen
        .iter()
        .find(|s| (200..300).contains(&s.status) && !s.credential)
    {
        bail!("the double answered {s} without the credential");
    }
    ensure!(
        seen.iter()
            .any(|s| s.target.starts_with(user_data_path) && s.status == 200),
        "the guest never got {user_data_path} from the double"
    );
    Ok(())
}

#[test]
fn ec2_imdsv2() {
    let image = image();
    TestCase::run("clouds-ec2", DEFAULT_BUDGET, |case| {
        let controller = start_controller()?;
        let imds = MetadataDouble::start(Cloud::Ec2, None)?;
        let mut b = cloud_vm(
            case,
            &image,
            "ec2",
            &imds,
            controller.addr().port(),
            // A Nitro instance: sys_vendor, product_name, bios_vendor.
            &[
                "type=0,vendor=Amazon EC2",
                "type=1,manufacturer=Amazon EC2,product=m5.large",
            ],
        )?;
        // The key pair chosen at launch: the platform's, not the user-data's.
        let key = b.ssh_public_key()?;
        imds.set_ssh_keys(&[&key]);
        // Reports every 5 s: the spot interruption below is seen at once.
        let ud = settings_only(&controller_url_link_local())
            .setting("AIWARE_AGENT_UPDATE_INTERVAL", "5")
            .render();
        imds.set_user_data(Some(ud.as_bytes()));
        let mut vm = b.start()?;
        prove(case, &mut vm, &controller, "ec2", "Amazon EC2")?;
        served_facts_shown(case, &vm, &controller, &imds)?;
        credentials_were_used(&imds, "/latest/user-data")?;
        let seen = imds.seen();
        ensure!(
            seen.first()
                .is_some_and(|s| s.method == "PUT" && s.status == 200),
            "the first request was not the IMDSv2 token PUT: {seen:?}"
        );
        let settings = agent_status(&vm, case.deadline())?["settings"].clone();
        eprintln!("clouds: ec2: settings as the agent shows them: {settings}");
        ensure!(
            settings.to_string().contains(EC2_INSTANCE_ID),
            "instance id {EC2_INSTANCE_ID} not in the settings: {settings}"
        );
        // EC2 announces a spot interruption: the node reports drain.
        let host = controller
            .hosts()
            .first()
            .map(|h| h.host_id.clone())
            .context("the engine did not register")?;
        let after = controller.statuses(&host).len();
        ensure!(
            controller
                .statuses(&host)
                .last()
                .is_some_and(|s| s["drain"] == false),
            "draining before any notice"
        );
        let announced = std::time::Instant::now();
        imds.set_spot_interruption(Some(
            r#"{"action": "terminate", "time": "2026-12-04T15:30:00Z"}"#,
        ));
        controller
            .wait_for_status(&host, after, Duration::from_secs(60), |s| {
                s["drain"] == true
            })
            .context("no status report said drain after the spot interruption notice")?;
        let said = vm.check(
            "journalctl -b -u aiw-agent -o cat --no-pager | grep -m1 'draining: EC2 spot interruption'",
            case.deadline(),
        )?;
        eprintln!(
            "clouds: ec2: spot interruption to a report saying drain in {:.1?}; the journal: {}",
            announced.elapsed(),
            said.trim()
        );
        Ok(())
    });
}

#[test]
fn gce_metadata_server() {
    let image = image();
    TestCase::run("clouds-gce", DEFAULT_BUDGET, |case| {
        let controller = start_controller()?;
        let md = MetadataDouble::start(Cloud::Gce, None)?;
        let mut b = cloud_vm(
            case,
            &image,
            "gce",
            &md,
            controller.addr().port(),
            &[
                "type=0,vendor=Google",
                "type=1,manufacturer=Google,product=Google Compute Engine",
            ],
        )?;
        let key = b.ssh_public_key()?;
        md.set_ssh_keys(&[&key]);
        let ud = settings_only(&controller_url_link_local()).render();
        md.set_user_data(Some(ud.as_bytes()));
        let mut vm = b.start()?;
        prove(case, &mut vm, &controller, "gce", "Google Compute Engine")?;
        served_facts_shown(case, &vm, &controller, &md)?;
        credentials_were_used(&md, "/computeMetadata/v1/instance/attributes/user-data")?;
        let settings = agent_status(&vm, case.deadline())?["settings"].to_string();
        ensure!(
            settings.contains(GCE_INSTANCE_ID),
            "instance id {GCE_INSTANCE_ID} not in the settings: {settings}"
        );
        Ok(())
    });
}

#[test]
fn azure_imds() {
    let image = image();
    TestCase::run("clouds-azure", DEFAULT_BUDGET, |case| {
        let controller = start_controller()?;
        let md = MetadataDouble::start(Cloud::Azure, None)?;
        let wire = MetadataDouble::start(Cloud::AzureWireServer, None)?;
        let mut b = qemu_tests::Vm::builder("azure", case.dir())
            .disk(&image.disk, image.format)
            .user_net(azure_net(
                md.port(),
                wire.port(),
                Some(controller.addr().port()),
            )?)
            .smbios("type=1,manufacturer=Microsoft Corporation,product=Virtual Machine")
            .smbios(
                "type=3,manufacturer=Microsoft Corporation,asset=7783-7084-3265-9085-8269-3286-77",
            );
        let key = b.ssh_public_key()?;
        md.set_ssh_keys(&[&key]);
        let ud = settings_only(&controller_url_link_local()).render();
        md.set_user_data(Some(ud.as_bytes()));
        let mut vm = b.start()?;
        prove(
            case,
            &mut vm,
            &controller,
            "azure",
            "7783-7084-3265-9085-8269-3286-77",
        )?;
        served_facts_shown(case, &vm, &controller, &md)?;
        credentials_were_used(&md, "/metadata/instance/compute/userData")?;
        let status = agent_status(&vm, case.deadline())?;
        let settings = status["settings"].to_string();
        ensure!(
            settings.contains(AZURE_VM_ID),
            "vmId {AZURE_VM_ID} not in the settings: {settings}"
        );
        // The provisioning "ready" report reached the wireserver double.
        eprintln!("clouds: wireserver double saw:\n{}", wire.log());
        let reports = wire.health_reports();
        ensure!(
            reports.len() == 1
                && reports[0].contains("<State>Ready</State>")
                && reports[0].contains(&format!(
                    "<InstanceId>{WIRESERVER_INSTANCE_ID}</InstanceId>"
                )),
            "the wireserver got {reports:?}"
        );
        ensure!(
            status["platform_checkin"]
                .as_str()
                .is_some_and(|c| c.contains("reported Ready")),
            "aiw-agent status: platform_checkin {}",
            status["platform_checkin"]
        );
        Ok(())
    });
}

#[test]
fn openstack_config_drive() {
    let image = image();
    TestCase::run("clouds-configdrive", DEFAULT_BUDGET, |case| {
        let controller = start_controller()?;
        let mut b = node_vm(case.dir(), "openstack", &image, Some(&controller))?
            .smbios("type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova");
        let key = b.ssh_public_key()?;
        let ud = settings_only(&controller_url_in_guest()).render();
        let uuid = "83679162-1378-4288-a2d4-70e13ec132aa";
        // Nova's name for the instance and the key pair it was launched with.
        let meta = serde_json::json!({
            "uuid": uuid,
            "hostname": "openstack-engine.novalocal",
            "name": "openstack-engine",
            "launch_index": 0,
            "availability_zone": "nova",
            "public_keys": {"aiwimg-test": key},
        })
        .to_string();
        let iso = case.dir().join("config-2.iso");
        make_iso(
            "config-2",
            &[
                ("openstack/latest/user_data", ud.as_bytes()),
                ("openstack/latest/meta_data.json", meta.as_bytes()),
                ("ec2/latest/meta-data.json", b"{}"),
            ],
            &iso,
        )?;
        let mut vm = b.drive(cdrom(&iso)).start()?;
        prove(case, &mut vm, &controller, "configdrive", "config-2")?;
        platform_facts_shown(
            case,
            &vm,
            &controller,
            &PlatformFacts {
                hostname: "openstack-engine.novalocal",
                instance_type: None,
            },
        )?;
        let settings = agent_status(&vm, case.deadline())?["settings"].to_string();
        ensure!(
            settings.contains(uuid),
            "uuid {uuid} not in the settings: {settings}"
        );
        Ok(())
    });
}

#[test]
fn vmware_ovf_environment_cdrom() {
    let image = image();
    TestCase::run("clouds-vmware", DEFAULT_BUDGET, |case| {
        let controller = start_controller()?;
        let mut b = node_vm(case.dir(), "vmware", &image, Some(&controller))?
            // QEMU's -smbios doubles a comma inside a value.
            .smbios("type=1,manufacturer=VMware,, Inc.,product=VMware7,,1");
        let key = b.ssh_public_key()?;
        let ud = settings_only(&controller_url_in_guest()).render();
        // The environment vSphere writes for the OVA's `hostname`,
        // `public-keys` and `user-data` properties (the ISO transport), the
        // user-data base64 as vSphere users give it.
        let env = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment
     xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv"
     oe:id=""
     ve:vCenterId="vm-1042">
   <PlatformSection>
      <Kind>VMware ESXi</Kind>
      <Version>8.0.2</Version>
      <Vendor>VMware, Inc.</Vendor>
      <Locale>en</Locale>
   </PlatformSection>
   <PropertySection>
         <Property oe:key="hostname" oe:value="vmware-engine"/>
         <Property oe:key="public-keys" oe:value="{key}"/>
         <Property oe:key="user-data" oe:value="{}"/>
   </PropertySection>
   <ve:EthernetAdapterSection>
      <ve:Adapter ve:mac="00:50:56:9a:10:42" ve:network="VM Network" ve:unitNumber="7"/>
   </ve:EthernetAdapterSection>
</Environment>
"#,
            base64(ud.as_bytes())
        );
        std::fs::write(case.dir().join("ovf-env.xml"), &env)?;
        let iso = case.dir().join("ovf-env.iso");
        make_iso("OVF ENV", &[("ovf-env.xml", env.as_bytes())], &iso)?;
        let mut vm = b.drive(cdrom(&iso)).start()?;
        prove(case, &mut vm, &controller, "vmware", "OVF ENV")?;
        platform_facts_shown(
            case,
            &vm,
            &controller,
            &PlatformFacts {
                hostname: "vmware-engine",
                instance_type: None,
            },
        )?;
        let settings = agent_status(&vm, case.deadline())?["settings"].to_string();
        ensure!(
            settings.contains("vm-1042"),
            "the environment's vCenterId is not the instance id: {settings}"
        );
        Ok(())
    });
}

#[test]
fn nocloud_cloud_localds_seed() {
    let image = image();
    TestCase::run("clouds-nocloud", DEFAULT_BUDGET, |case| {
        if !on_path("cloud-localds") {
            bail!("cloud-localds not found: install the `cloud-image-utils` package");
        }
        let controller = start_controller()?;
        let mut b = node_vm(case.dir(), "nocloud", &image, Some(&controller))?;
        let key = b.ssh_public_key()?;
        let dir = case.dir().join("nocloud-seed");
        std::fs::create_dir_all(&dir)?;
        let (ud, md, iso) = (
            dir.join("user-data"),
            dir.join("meta-data"),
            dir.join("seed.iso"),
        );
        std::fs::write(&ud, settings_only(&controller_url_in_guest()).render())?;
        // The name and key in meta-data, as the guide's `cloud-localds` user
        // launches (the seed of issue 13's report named `ceo-engine`).
        std::fs::write(
            &md,
            format!(
                "instance-id: iid-clouds-nocloud\nlocal-hostname: nocloud-engine\n\
                 public-keys:\n  - {key}\n"
            ),
        )?;
        run_checked(
            Command::new("cloud-localds").arg(&iso).arg(&ud).arg(&md),
            Duration::from_secs(60),
        )?;
        let mut vm = b.drive(cdrom(&iso)).start()?;
        prove(case, &mut vm, &controller, "nocloud", "cidata")?;
        platform_facts_shown(
            case,
            &vm,
            &controller,
            &PlatformFacts {
                hostname: "nocloud-engine",
                instance_type: None,
            },
        )?;
        Ok(())
    });
}

/// A copy of the raw image, as `dd`/`bmaptool copy` leaves it on a disk.
fn flashed_copy(case: &TestCase, image: &TestImage) -> Result<(PathBuf, u64)> {
    ensure!(
        image.format == DiskFormat::Raw,
        "the engine image has no raw file to flash"
    );
    for t in ["mcopy", "mtype", "mmd"] {
        if !on_path(t) {
            bail!("{t} not found: install the `mtools` package");
        }
    }
    let esp = image
        .manifest
        .rest
        .get("partitions")
        .and_then(|p| p.as_array())
        .and_then(|p| p.iter().find(|p| p["type"] == "esp"))
        .and_then(|p| p["offset"].as_u64())
        .context("manifest.json lists no ESP partition with an offset")?;
    let copy = case.dir().join("flashed.raw");
    run_checked(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(&image.disk)
            .arg(&copy),
        Duration::from_secs(300),
    )?;
    Ok((copy, esp))
}

/// `mcopy` of `data` to `::/<to>` in the FAT file system at `offset` of `disk`.
fn esp_write(disk: &Path, offset: u64, to: &str, data: &[u8]) -> Result<()> {
    let tmp = disk.with_extension("mcopy.tmp");
    std::fs::write(&tmp, data)?;
    run_checked(
        Command::new("mcopy")
            .args(["-o", "-i"])
            .arg(format!("{}@@{offset}", disk.display()))
            .arg(&tmp)
            .arg(format!("::/{to}")),
        Duration::from_secs(60),
    )?;
    std::fs::remove_file(&tmp)?;
    Ok(())
}

fn esp_read(disk: &Path, offset: u64, file: &str) -> Result<String> {
    Ok(run_checked(
        Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@{offset}", disk.display()))
            .arg(format!("::/{file}")),
        Duration::from_secs(60),
    )?
    .stdout)
}

#[test]
fn bare_metal_esp_user_data() {
    let image = image();
    TestCase::run("clouds-esp", DEFAULT_BUDGET, |case| {
        let controller = start_controller()?;
        let (disk, esp) = flashed_copy(case, &image)?;
        let mut b = node_vm(case.dir(), "baremetal", &image, Some(&controller))?
            .disk(&disk, DiskFormat::Raw);
        let key = b.ssh_public_key()?;
        let ud = joining("baremetal-engine", &controller_url_in_guest(), &key);
        esp_write(&disk, esp, "aiware/user-data", ud.as_bytes())?;
        ensure!(
            esp_read(&disk, esp, "aiware/user-data")? == ud,
            "aiware/user-data did not read back from the ESP"
        );
        let mut vm = b.start()?;
        prove(case, &mut vm, &controller, "esp", "/efi/aiware/user-data")?;
        drop(vm);
        // The flashed copy is as big as the image; kept only when the test fails.
        std::fs::remove_file(&disk)?;
        Ok(())
    });
}

/// The image boots systemd-boot, which starts the UKI (kernel, initrd and a
/// fixed `.cmdline`); `loader.conf` has `editor no`, so nobody types kernel
/// arguments at the boot menu. What does work, without Secure Boot: a Boot
/// Loader Specification entry on the ESP (`loader/entries/*.conf`, `efi` =
/// the same UKI, `options` = its command line plus `aiware.*` words) made the
/// default; systemd-boot passes `options` to the UKI and systemd-stub uses
/// them in place of the built-in `.cmdline` when Secure Boot is off. Under
/// Secure Boot the stub ignores them (by design), so on such machines the
/// kernel command line is not a way to pass launch data to this image. The
/// words carry no SSH key (`KEY=VALUE` settings have none), so this test asks
/// the node through its console and the controller, not over SSH.
#[test]
fn kernel_command_line() {
    let image = image();
    TestCase::run("clouds-cmdline", DEFAULT_BUDGET, |case| {
        let dl = case.deadline();
        let controller = start_controller()?;
        let (disk, esp) = flashed_copy(case, &image)?;
        let base = image
            .manifest
            .rest
            .get("cmdline")
            .and_then(|c| c.as_str())
            .context("manifest.json has no cmdline")?
            .to_string();
        let uki = format!(
            "aiware-{}_{}.efi",
            image.manifest.profile, image.manifest.version
        );
        esp_read(&disk, esp, &format!("EFI/Linux/{uki}"))
            .with_context(|| format!("the ESP has no EFI/Linux/{uki}"))?;
        let words = format!(
            "aiware.mode=engine aiware.license={TEST_LICENSE} aiware.controller={} \
             aiware.init_token={TEST_INIT_TOKEN}",
            controller_url_in_guest()
        );
        let entry = format!(
            "title aiWARE node (launch data on the kernel command line)\n\
             efi /EFI/Linux/{uki}\noptions {base} {words}\n"
        );
        // The image's ESP has no loader/entries/ yet (the UKI is found in EFI/Linux/).
        run_checked(
            Command::new("mmd")
                .arg("-i")
                .arg(format!("{}@@{esp}", disk.display()))
                .arg("::/loader/entries"),
            Duration::from_secs(60),
        )?;
        esp_write(
            &disk,
            esp,
            "loader/entries/aiware-cmdline.conf",
            entry.as_bytes(),
        )?;
        esp_write(
            &disk,
            esp,
            "loader/loader.conf",
            b"timeout 0\neditor no\ndefault aiware-cmdline.conf\n",
        )?;
        std::fs::write(case.dir().join("loader-entry.conf"), &entry)?;
        let mut vm = node_vm(case.dir(), "cmdline", &image, Some(&controller))?
            .disk(&disk, DiskFormat::Raw)
            .start()?;
        let report = vm.wait_for_agent(dl)?;
        let took = vm.since_boot();
        case.timing("boot to ready", took);
        let line = match report {
            AgentReport::Ready(l) => l,
            AgentReport::InvalidSettings(l) => bail!("the agent refused the words: {l}"),
        };
        let kernel_line = vm
            .boot_lines()
            .into_iter()
            .find(|l| l.contains("Kernel command line:"))
            .unwrap_or_default();
        eprintln!(
            "clouds: clouds-cmdline: kernel: {kernel_line}\nclouds: clouds-cmdline: {line}; boot to ready {took:.1?}"
        );
        if !line.contains("datasource=cmdline") {
            bail!(
                "the agent did not take the kernel command line (systemd-stub may have kept the \
                 UKI's built-in .cmdline): {line}; kernel line: {kernel_line:?}"
            );
        }
        let hosts = wait_for_hosts(&controller, 1, dl)?;
        eprintln!(
            "clouds: clouds-cmdline: datasource cmdline (the kernel command line has aiware.* words); \
             joined the test controller as {}",
            hosts[0].host_id
        );
        drop(vm);
        std::fs::remove_file(&disk)?;
        Ok(())
    });
}

#[test]
fn no_user_data_at_all() {
    let image = image();
    TestCase::run("clouds-none", DEFAULT_BUDGET, |case| {
        let dl = case.deadline();
        // An EC2 instance launched without user-data: IMDS answers 404 for it.
        let imds = MetadataDouble::start(Cloud::Ec2, None)?;
        let mut vm = qemu_tests::Vm::builder("none", case.dir())
            .disk(&image.disk, image.format)
            .user_net(metadata_net(Some(imds.port()), None)?)
            .smbios("type=1,manufacturer=Amazon EC2,product=t3.small")
            .start()?;
        let said = vm.wait_for_line("aiw-agent: no user-data found", dl)?;
        let ready = vm.wait_for_line("aiw-agent: ready (no modes, no user-data)", dl)?;
        let took = vm.since_boot();
        case.timing("boot to ready", took);
        eprintln!(
            "clouds: clouds-none: {said}\nclouds: clouds-none: {ready}; boot to ready {took:.1?}\n\
             clouds: clouds-none: IMDS double saw:\n{}",
            imds.log()
        );
        ensure!(
            imds.seen()
                .iter()
                .any(|s| s.target == "/latest/user-data" && s.status == 404),
            "the agent never asked IMDS for user-data"
        );
        // The agent's datasource deadline is 90 s; readiness must not wait that out.
        ensure!(
            took < Duration::from_secs(60 * 5),
            "ready only after {took:?}"
        );
        Ok(())
    });
}

fn cdrom(iso: &Path) -> ExtraDrive {
    ExtraDrive {
        path: iso.to_path_buf(),
        format: DiskFormat::Raw,
        bus: DriveBus::Cdrom,
        read_only: true,
    }
}
