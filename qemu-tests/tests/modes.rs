//! Run-mode tests of issue 5: the native services of the `anywhere` image,
//! configured from user-data and checked with real clients from the host
//! (psql, redis-cli, openssl s_client, HTTP) through forwarded ports.
//! Host clients: `builder/setup-host.sh --tests` installs them.
//!
//! Run: `cargo test -p qemu-tests --test modes -- --test-threads=1 --nocapture`.

use anyhow::{ensure, Context, Result};
use qemu_tests::checks::{
    agent_status, assert_active, assert_no_failed_units, assert_not_active,
    parse_prometheus_targets, wait_listening,
};
use qemu_tests::docker_archive::{hello_image_archive, HELLO_LINE, HELLO_TAG};
use qemu_tests::node::{joining_user_data, node_vm, start_controller};
use qemu_tests::test_images::{image_for, TestImage};
use qemu_tests::{TestCase, UserData};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ALL_MODES: &str = "api,controller,db,es,engine,lb,minio,nfs,nsq,prometheus,redis,registry";
const DOMAIN: &str = "aiware.modes.test";
const BUDGET: Duration = Duration::from_secs(12 * 60);

fn image(profile: &str) -> TestImage {
    image_for(profile).unwrap_or_else(|e| panic!("no {profile:?} image to boot: {e:#}"))
}

/// Runs a host client; its stdout, or an error with everything it said.
fn host(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (builder/setup-host.sh --tests installs it)"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// A plain HTTP/1.0 request to 127.0.0.1:port; the body.
fn http(port: u16, method: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    ensure!(
        head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200"),
        "{method} {path}: {head}"
    );
    Ok(body.to_string())
}

/// A self-signed certificate and its key for `cn`, made with openssl on the host.
fn self_signed(dir: &Path, cn: &str) -> Result<(String, String)> {
    let (cert, key) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
    host(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN={cn}/O=aiwimg modes test"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )?;
    Ok((
        std::fs::read_to_string(cert)?,
        std::fs::read_to_string(key)?,
    ))
}

fn write_file_yaml(path: &str, content: &str, perms: &str) -> String {
    format!(
        "  - path: {path}\n    permissions: \"{perms}\"\n    content: {}\n",
        serde_json::to_string(content).unwrap()
    )
}

/// True when a TCP client through the forward gets no answer to PING: the
/// guest refused or dropped the connection.
fn port_closed(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return true;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    if s.write_all(b"PING\r\n").is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => true,
        Ok(n) => {
            eprintln!(
                "port {port} answered: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            false
        }
    }
}

/// Prometheus' targets: (job, instance, health).
fn prometheus_targets(port: u16) -> Result<Vec<(String, String, String)>> {
    parse_prometheus_targets(&http(port, "GET", "/api/v1/targets")?)
}

/// The `anywhere` profile with all twelve modes: every native service active,
/// each checked with its own client.
#[test]
fn anywhere_all_modes() {
    let image = image("anywhere");
    TestCase::run("modes-anywhere", BUDGET, |case| {
        let dl = case.deadline();
        let (cert, key) = self_signed(case.dir(), DOMAIN)?;
        let controller = start_controller()?;
        let files = format!(
            "write_files:\n{}{}{}",
            write_file_yaml("/opt/aiware/haproxy/certs/server.pem", &cert, "0644"),
            write_file_yaml("/opt/aiware/haproxy/certs/server.pem.key", &key, "0600"),
            write_file_yaml("/opt/aiware/haproxy/certs/ca.pem", &cert, "0644"),
        );
        let ud: UserData = joining_user_data("anywhere-1", ALL_MODES)
            .setting("AIWARE_DOMAIN_NAME", DOMAIN)
            .setting("AIWARE_DB_NAME", "aiware_jobs")
            .setting("AIWARE_DB_USER", "veritone")
            .setting("AIWARE_DB_PASS", "db-pass-from-user-data")
            .setting("AIWARE_REDIS_PASSWORD", "redis-pass-from-user-data")
            .setting("AIWARE_NFS_PERMITTED", "10.0.2.0/24,192.168.50.7")
            .raw_yaml(&files);
        let mut vm = node_vm(case.dir(), "anywhere", &image, Some(&controller))?
            .memory_mib(4096)
            .cpus(2)
            .user_data(ud)
            .host_forward(5432)?
            .host_forward(6379)?
            .host_forward(5000)?
            .host_forward(9090)?
            .host_forward(443)?
            .host_forward(111)?
            .start()?;
        let took = vm.wait_ready(dl)?;
        case.timing("anywhere: boot to ready (all twelve modes)", took);
        vm.wait_ssh(dl)?;
        let fwd = |p: u16| vm.host_port(p).expect("forwarded");

        let native = [
            "postgresql.service",
            "nfs-server.service",
            "redis-server.service",
            "haproxy.service",
            "prometheus.service",
            "docker-registry.service",
            "docker.service",
            "prometheus-node-exporter.service",
            "ssh.service",
        ];
        assert_active(&vm, &native, dl)?;
        wait_listening(
            &vm,
            &[5432, 2049, 6379, 80, 443, 9090, 5000, 8000, 9100],
            dl,
        )?;
        case.timing("anywhere: every native service active", vm.since_boot());

        // db: psql from the host with the user-data's database, user and password.
        let out = host(
            Command::new("psql")
                .env("PGPASSWORD", "db-pass-from-user-data")
                .env("PGCONNECT_TIMEOUT", "20")
                .args(["-h", "127.0.0.1", "-p", &fwd(5432).to_string()])
                .args(["-U", "veritone", "-d", "aiware_jobs", "-tAc"])
                .arg("select current_user || '@' || current_database() || ':' || 6*7"),
        )?;
        ensure!(out.trim() == "veritone@aiware_jobs:42", "psql said {out:?}");
        let data = vm.check(
            "ls /var/opt/aiware/postgres/*/PG_VERSION && findmnt -n -o TARGET --target /var/opt/aiware/postgres",
            dl,
        )?;
        ensure!(
            data.trim_end().ends_with("/var"),
            "PostgreSQL data not on /var: {data}"
        );

        // redis: PONG with the password, refused without.
        let rport = fwd(6379).to_string();
        let pong = host(
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &rport, "--no-auth-warning"])
                .args(["-a", "redis-pass-from-user-data", "ping"]),
        )?;
        ensure!(
            pong.trim() == "PONG",
            "redis-cli with the password: {pong:?}"
        );
        let no = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &rport, "ping"])
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&no.stdout),
            String::from_utf8_lossy(&no.stderr)
        );
        ensure!(
            said.contains("NOAUTH") && !said.contains("PONG"),
            "redis-cli without the password was not refused: {said:?}"
        );

        // lb: HAProxy serves TLS with the user-data's certificate.
        let s = host(Command::new("sh").arg("-c").arg(format!(
            "openssl s_client -connect 127.0.0.1:{} -servername {DOMAIN} </dev/null 2>/dev/null | openssl x509 -noout -subject",
            fwd(443)
        )))?;
        ensure!(
            s.contains(&format!("CN={DOMAIN}")) || s.contains(&format!("CN = {DOMAIN}")),
            "openssl s_client: subject {s:?}"
        );

        // nfs: exported to the permitted clients only.
        let ex = vm.check("exportfs -v", dl)?;
        ensure!(
            ex.contains("/opt/aiware/nfs")
                && ex.contains("10.0.2.0/24")
                && ex.contains("192.168.50.7"),
            "exportfs -v: {ex}"
        );
        ensure!(!ex.contains("<world>"), "exported to the world: {ex}");

        // registry: push a locally made image with Docker, remove it, pull it back, run it.
        vm.check_with_input("docker load", &hello_image_archive(), dl)?;
        let tagged = "127.0.0.1:5000/aiwimg-test/hello:1";
        vm.check(
            &format!("docker tag {HELLO_TAG} {tagged} && docker push {tagged}"),
            dl,
        )?;
        vm.check(&format!("docker rmi {tagged} {HELLO_TAG}"), dl)?;
        vm.check(&format!("docker pull {tagged}"), dl)?;
        let ran = vm.check(&format!("docker run --rm {tagged}"), dl)?;
        ensure!(ran.trim() == HELLO_LINE, "pulled image printed {ran:?}");
        let catalog = http(fwd(5000), "GET", "/v2/_catalog")?;
        ensure!(
            catalog.contains("aiwimg-test/hello"),
            "registry catalog from the host: {catalog}"
        );
        let stored = vm.check(
            "ls /var/opt/aiware/registry/docker/registry/v2/repositories/aiwimg-test",
            dl,
        )?;
        ensure!(stored.contains("hello"), "registry storage: {stored}");

        // prometheus: its own, the agent's and node exporter's targets up.
        let targets = dl.poll("Prometheus targets up", || {
            let t = prometheus_targets(fwd(9090))?;
            let up = |job: &str| t.iter().any(|(j, _, h)| j == job && h == "up");
            let hosts_up = t
                .iter()
                .filter(|(j, i, h)| j == "aiware-hosts" && h == "up" && !i.ends_with(":8001"))
                .count();
            Ok(
                (up("prometheus") && up("aiware-agent") && up("node") && hosts_up >= 2)
                    .then_some(t),
            )
        })?;
        eprintln!("prometheus targets: {targets:?}");

        // es: its sysctl; the containerized modes' folders.
        let mmc = vm.check("sysctl -n vm.max_map_count", dl)?;
        ensure!(mmc.trim() == "262144", "vm.max_map_count = {mmc}");
        vm.check(
            "for d in api controller es engine minio nsq; do test -d /var/opt/aiware/$d || { echo missing $d; exit 1; }; done",
            dl,
        )?;

        // Firewall: a listening port of no mode (rpcbind, 111) is not reachable.
        ensure!(
            vm.check("ss -Hltn 'sport = :111'", dl)?.contains(":111"),
            "rpcbind not listening: nothing to check"
        );
        ensure!(
            port_closed(fwd(111)),
            "port 111 (no mode's) answered from the host"
        );
        let status = agent_status(&vm, dl)?;
        let ports: Vec<&str> = status["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        for p in [
            "tcp/22", "tcp/443", "tcp/5432", "tcp/6379", "tcp/9200", "tcp/2049",
        ] {
            ensure!(
                ports.contains(&p),
                "aiw-agent status ports {ports:?} lack {p}"
            );
        }
        assert_no_failed_units(&vm, dl)?;
        ensure!(
            status["settings_valid"] == true,
            "settings not valid: {status}"
        );
        Ok(())
    });
}

/// A db-only node of the `anywhere` image: other modes' services stay stopped,
/// and their ports are closed even with something listening on them; the db
/// password is generated (0600) when user-data gives none.
#[test]
fn db_node_other_modes_closed() {
    let image = image("anywhere");
    TestCase::run("modes-db-only", BUDGET, |case| {
        let dl = case.deadline();
        let ud = UserData::cloud_config()
            .hostname("db-1")
            .setting("AIWARE_MODE", "db");
        let mut vm = node_vm(case.dir(), "db-only", &image, None)?
            .memory_mib(2048)
            .user_data(ud)
            .host_forward(5432)?
            .host_forward(6379)?
            .start()?;
        let took = vm.wait_ready(dl)?;
        case.timing("db node: boot to ready", took);
        vm.wait_ssh(dl)?;
        assert_active(&vm, &["postgresql.service"], dl)?;
        assert_not_active(
            &vm,
            &[
                "redis-server.service",
                "haproxy.service",
                "nfs-server.service",
                "prometheus.service",
                "docker-registry.service",
                "docker.service",
            ],
            dl,
        )?;
        wait_listening(&vm, &[5432], dl)?;

        // The generated password: 0600 root, never logged, and it works.
        let st = vm.check("stat -c '%a %U' /var/lib/aiware/secrets/db-password", dl)?;
        ensure!(st.trim() == "600 root", "db-password file: {st}");
        let pw = vm.check("cat /var/lib/aiware/secrets/db-password", dl)?;
        let pw = pw.trim();
        ensure!(pw.len() >= 32, "generated password too short");
        let journal = vm.check(
            &format!("journalctl -b --no-pager -o cat | grep -c -F -- '{pw}' || true"),
            dl,
        );
        if let Ok(n) = journal {
            ensure!(n.trim() == "0", "the generated password is in the journal");
        }
        let out = host(
            Command::new("psql")
                .env("PGPASSWORD", pw)
                .env("PGCONNECT_TIMEOUT", "20")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &vm.host_port(5432).unwrap().to_string(),
                ])
                .args([
                    "-U",
                    "aiware",
                    "-d",
                    "aiware",
                    "-tAc",
                    "select 'ok:' || current_user",
                ]),
        )?;
        ensure!(out.trim() == "ok:aiware", "psql said {out:?}");
        let bad = Command::new("psql")
            .env("PGPASSWORD", "wrong")
            .env("PGCONNECT_TIMEOUT", "20")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &vm.host_port(5432).unwrap().to_string(),
            ])
            .args(["-U", "aiware", "-d", "aiware", "-tAc", "select 1"])
            .output()?;
        ensure!(!bad.status.success(), "psql with a wrong password got in");

        // A Redis started by hand on 6379 answers inside, but the firewall
        // keeps the port of the redis mode (not enabled here) closed.
        vm.check(
            "redis-server --port 6379 --protected-mode no --daemonize yes --dir /tmp --save '' && sleep 1 && redis-cli -p 6379 ping",
            dl,
        )?;
        ensure!(
            port_closed(vm.host_port(6379).unwrap()),
            "6379 (redis mode not enabled) answered from the host"
        );
        let rules = vm.check("nft list table inet aiware", dl)?;
        ensure!(
            rules.contains("policy drop") && rules.contains("5432") && !rules.contains("6379"),
            "nftables: {rules}"
        );
        let status = agent_status(&vm, dl)?;
        ensure!(
            status["ports"] == serde_json::json!(["tcp/22", "tcp/5432", "tcp/8000", "tcp/9100"]),
            "aiw-agent status ports: {}",
            status["ports"]
        );
        let human = vm.check("aiw-agent status", dl)?;
        ensure!(
            human.contains("ports:      tcp/22 tcp/5432 tcp/8000 tcp/9100"),
            "aiw-agent status: {human}"
        );
        assert_no_failed_units(&vm, dl)?;
        Ok(())
    });
}
