//! An aiWARE node under test: a VM of a built image, launched with
//! user-data that points it at an [`EdgeTestController`] on the host's
//! loopback, reached from the guest at [`CONTROLLER_GUEST_ADDR`]:9000.

use crate::edge_controller::{EdgeTestController, BASE_PATH};
use crate::seed::UserData;
use crate::test_images::TestImage;
use crate::vm::{Vm, VmBuilder};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

/// Where the guest finds the test controller (a guest forward to the host's loopback).
pub const CONTROLLER_GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
/// The Edge API port of the guide.
pub const CONTROLLER_GUEST_PORT: u16 = 9000;
/// The init token the test controller accepts.
pub const TEST_INIT_TOKEN: &str = "aiwimg-test-init-token";
/// A license key for tests (the agent only checks one is given).
pub const TEST_LICENSE: &str = "aiwimg-test-license";

/// `AIWARE_CONTROLLER` as the guest sees it.
pub fn controller_url_in_guest() -> String {
    format!("http://{CONTROLLER_GUEST_ADDR}:{CONTROLLER_GUEST_PORT}{BASE_PATH}")
}

/// A test controller on 127.0.0.1 that tells hosts to mount no NFS cache
/// (a single node has no NFS server to mount).
pub fn start_controller() -> Result<EdgeTestController> {
    let c = EdgeTestController::start("127.0.0.1:0", TEST_INIT_TOKEN)
        .context("starting the Edge API test controller")?;
    c.set_nfs_cache(None);
    Ok(c)
}

/// User-data of the guide for `modes`, joining the test controller.
pub fn joining_user_data(hostname: &str, modes: &str) -> UserData {
    UserData::cloud_config()
        .hostname(hostname)
        .setting("AIWARE_MODE", modes)
        .setting("AIWARE_LICENSE", TEST_LICENSE)
        .setting("AIWARE_CONTROLLER", &controller_url_in_guest())
        .setting("AIWARE_INIT_TOKEN", TEST_INIT_TOKEN)
}

/// A VM of `image` whose guest reaches `controller` at [`controller_url_in_guest`].
pub fn node_vm(
    case_dir: &Path,
    name: &str,
    image: &TestImage,
    controller: Option<&EdgeTestController>,
) -> Result<VmBuilder> {
    let mut b = Vm::builder(name, case_dir).disk(&image.disk, image.format);
    if let Some(c) = controller {
        b = b.guest_forward(
            CONTROLLER_GUEST_ADDR,
            CONTROLLER_GUEST_PORT,
            c.addr().port(),
        )?;
    }
    Ok(b)
}

/// Waits until the controller knows exactly `n` hosts.
pub fn wait_for_hosts(
    controller: &EdgeTestController,
    n: usize,
    deadline: &crate::Deadline,
) -> Result<Vec<crate::edge_controller::HostRecord>> {
    controller.wait_for(deadline.cap(Duration::from_secs(120)), |h| h.len() >= n);
    let hosts = controller.hosts();
    if hosts.len() != n {
        bail!(
            "the test controller knows {} hosts, expected {n}: {:?} ({} requests seen)",
            hosts.len(),
            hosts.iter().map(|h| &h.host_id).collect::<Vec<_>>(),
            controller.requests()
        );
    }
    Ok(hosts)
}

/// The sorted run modes a host registered with.
pub fn sorted_modes(host: &crate::edge_controller::HostRecord) -> Vec<String> {
    let mut m = host.run_modes();
    m.sort();
    m
}

/// Sorted `a,b,c` as a list.
pub fn mode_list(modes: &str) -> Vec<String> {
    let mut m: Vec<String> = modes.split(',').map(|s| s.trim().to_string()).collect();
    m.sort();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_sees_the_controller_at_the_guide_port_and_path() {
        assert_eq!(controller_url_in_guest(), "http://10.0.2.100:9000/edge/v1");
        let ud = joining_user_data("e1", "engine").render();
        assert!(
            ud.contains("AIWARE_CONTROLLER: \"http://10.0.2.100:9000/edge/v1\""),
            "{ud}"
        );
        assert!(
            ud.contains(&format!("AIWARE_INIT_TOKEN: \"{TEST_INIT_TOKEN}\"")),
            "{ud}"
        );
        assert_eq!(mode_list("nfs, controller,db"), ["controller", "db", "nfs"]);
    }

    #[test]
    fn the_test_controller_is_reachable_on_loopback_only() {
        let c = start_controller().unwrap();
        assert!(c.addr().ip().is_loopback());
    }
}
