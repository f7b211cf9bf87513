//! A throwaway PostgreSQL cluster: Debian's `postgresql` binaries, a data directory made by `initdb` under
//! `target/`, a free loopback port, and a database `flotilla` owned by a user `flotilla` with a password. Stopped
//! and removed on drop. The system's own cluster is never touched.
//!
//! initdb refuses to run as root, so as root the cluster runs as the `postgres` user that Debian's package made,
//! and its directory belongs to that user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::registry::free_port;
use super::require;

pub const USER: &str = "flotilla";
pub const PASSWORD: &str = "fleet-secret";
pub const DATABASE: &str = "flotilla";

pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    /// Who runs the cluster's programs: `postgres` when the tests run as root, else the tests' own user.
    run_as: Option<&'static str>,
    /// What the server is started with beside its port and socket.
    options: String,
    running: bool,
}

/// The newest of Debian's installed PostgreSQL versions' binaries.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

/// A new directory for a cluster: under `target/pg-test/`, unless the `postgres` user cannot reach it there (a
/// clone in root's private home) or the server's socket path in it would be too long for a Unix socket (107 bytes);
/// then under the system's temporary directory.
fn cluster_dir(root: bool) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pg-test");
    std::fs::create_dir_all(&target).expect("make target/pg-test");
    let reachable = !root
        || Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(&target)
            .status()
            .is_ok_and(|s| s.success());
    let short = target.join(&name).join(".s.PGSQL.65535").as_os_str().len() < 107;
    let dir = if reachable && short {
        target.join(name)
    } else {
        std::env::temp_dir().join(format!("flotilla-pg-test-{name}"))
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("make the cluster's directory");
    dir
}

impl Cluster {
    /// A running cluster, or `None` (the test skips) when PostgreSQL is not installed.
    pub fn start() -> Option<Cluster> {
        Cluster::start_with(&[], None)
    }

    /// A cluster that offers TLS with `ca`'s server certificate, and listens on each of `addresses` too.
    pub fn start_tls(ca: &super::registry::TestCa, addresses: &[&str]) -> Option<Cluster> {
        Cluster::start_with(addresses, Some(ca))
    }

    fn start_with(addresses: &[&str], tls: Option<&super::registry::TestCa>) -> Option<Cluster> {
        let bin = require(
            "PostgreSQL's server binaries (/usr/lib/postgresql/*/bin; apt install postgresql)",
            bin_dir(),
        )?;
        let root = rustix::process::geteuid().is_root();
        let dir = cluster_dir(root);
        let mut c = Cluster {
            bin,
            dir,
            port: free_port(),
            run_as: root.then_some("postgres"),
            options: format!(
                "-c listen_addresses={}",
                ["127.0.0.1"]
                    .iter()
                    .chain(addresses)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            running: false,
        };
        if let Some(ca) = tls {
            // The server reads its key only when it is private to it.
            let (cert, key) = (c.dir.join("server.pem"), c.dir.join("server.key"));
            std::fs::copy(&ca.cert_pem, &cert).expect("copy the server certificate");
            std::fs::copy(&ca.key_pem, &key).expect("copy the server key");
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod the server key");
            c.options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
        let pwfile = c.dir.join("superuser-password");
        std::fs::write(&pwfile, "superuser-secret\n").expect("write the password file");
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&c.dir)
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown the cluster's directory to postgres"
            );
        }
        // Trust on the socket (in the cluster's own directory, which only its user reaches) for the setup below;
        // passwords on TCP, which is what the tests' clients use.
        c.run(
            "initdb",
            &[
                "-D".as_ref(),
                c.data().as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "--pwfile".as_ref(),
                pwfile.as_os_str(),
                "--no-sync".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
            ],
        );
        c.resume();
        c.psql(
            "postgres",
            &format!("CREATE USER {USER} PASSWORD '{PASSWORD}'"),
        );
        // CREATE DATABASE cannot share a statement string (a transaction) with another.
        c.psql(
            "postgres",
            &format!("CREATE DATABASE {DATABASE} OWNER {USER}"),
        );
        Some(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `postgres://flotilla:…@127.0.0.1:PORT/flotilla?sslmode=disable`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{DATABASE}?sslmode=disable",
            self.port
        )
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) {
        let out = self
            .command(program)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}{}\n(server log: {})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }

    /// Runs SQL as the superuser in `database`, over the cluster's socket.
    pub fn psql(&self, database: &str, sql: &str) {
        self.run(
            "psql",
            &[
                "-X".as_ref(),
                "-q".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-h".as_ref(),
                self.dir.as_os_str(),
                "-p".as_ref(),
                self.port.to_string().as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-d".as_ref(),
                database.as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
        );
    }

    /// What `sql` prints, unaligned and without headers (`psql -tA`), run as the superuser in `database`.
    pub fn query(&self, database: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = self
            .command("psql")
            .args(["-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &port, "-U", "postgres", "-d", database, "-c", sql])
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("run psql: {e}"));
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs one of PostgreSQL's client programs (`pg_dump`, `createdb`, ...) as the superuser, reaching the cluster
    /// through `PGHOST`, `PGPORT` and `PGUSER` as an operator's shell on the database's host does, so that `args`
    /// are what the README gives. It runs in the cluster's directory, where the superuser may write a dump.
    pub fn client(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .env("PGHOST", &self.dir)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The cluster's directory, which its superuser owns.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the cluster (again) on its port.
    pub fn resume(&mut self) {
        let options = format!(
            "{} -p {} -k {} -c fsync=off",
            self.options,
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data().as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "start".as_ref(),
            ],
        );
        self.running = true;
    }

    /// Stops the cluster at once, as a crash would: every connection is cut.
    pub fn kill(&mut self) {
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data().as_os_str(),
                "-w".as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "stop".as_ref(),
            ],
        );
        self.running = false;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
