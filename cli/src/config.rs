//! The home's configuration file, `HOME/meshchat.toml`, merged with environment variables and
//! flags into the [`Settings`] a node runs with: flags > environment > file > defaults. A bad
//! file is one sentence naming the file, the line and the problem. Bootstrap addresses given on
//! the command line are remembered in the file. See `docs/cli.md`, section "Configuration".

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use libp2p::Multiaddr;
use meshchat_node::NodeConfig;
use serde::Deserialize;
use serde_json::{json, Value};
use toml::Spanned;

use crate::{
    args::NodeArgs,
    exit::{Failure, BAD_CONFIG, USAGE},
};

/// The file's name inside the home.
pub(crate) const FILE_NAME: &str = "meshchat.toml";
/// The largest configuration file read.
const MAX_FILE_BYTES: u64 = 256 * 1024;
/// Bounds of `send_timeout_secs` (the control request allows the node 300 s for a send).
const SEND_TIMEOUT_SECS: Range<u64> = 1..241;

/// What a new home's file says: every key, commented out, with its default.
pub(crate) const TEMPLATE: &str = r#"# meshchat configuration for this home. Every key is optional; a flag or an environment
# variable overrides the value here (flags > environment > this file > defaults).
# See `meshchat config` for the values in effect and `docs/cli.md` for the details.

# Addresses to listen on (default: all interfaces, random TCP and QUIC ports).
# listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]

# Peers to connect to first: full multiaddrs ending in /p2p/PEER_ID. Addresses given with
# --bootstrap are added here.
# bootstrap = []

# Answer DHT queries and store records for others from the start.
# dht_server = false

# Local network only: find peers by mDNS, no bootstrap node, no relays. A node with no
# bootstrap peers runs this way anyway while mDNS is on.
# lan_only = false

# Look for peers on the local network by mDNS (only when listening beyond loopback).
# mdns = true

# This node's public address(es), when it cannot learn them itself (a home server behind
# port forwarding). Full multiaddrs without /p2p/.
# external = ["/ip4/203.0.113.7/tcp/4001"]

# How long a send tries to reach the recipient before it reports "queued" (1 to 240).
# send_timeout_secs = 10

# Log filter for stderr, e.g. "info" or "warn,meshchat_node=debug".
# log_level = "warn"
"#;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Vec<Spanned<String>>>,
    bootstrap: Option<Vec<Spanned<String>>>,
    dht_server: Option<bool>,
    lan_only: Option<bool>,
    mdns: Option<bool>,
    external: Option<Vec<Spanned<String>>>,
    send_timeout_secs: Option<Spanned<u64>>,
    log_level: Option<Spanned<String>>,
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Flag,
    Env,
    File,
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::File => "file",
            Source::Default => "default",
        })
    }
}

/// A value and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Setting<T> {
    pub(crate) value: T,
    pub(crate) source: Source,
}

/// The merged configuration of one invocation.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The file (it may not exist).
    pub(crate) file: PathBuf,
    /// Empty: the node's default (all interfaces, random ports).
    pub(crate) listen: Setting<Vec<Multiaddr>>,
    pub(crate) bootstrap: Setting<Vec<Multiaddr>>,
    pub(crate) dht_server: Setting<bool>,
    pub(crate) lan_only: Setting<bool>,
    /// mDNS discovery (default on; only effective when listening beyond loopback).
    pub(crate) mdns: Setting<bool>,
    /// Public addresses given by the user.
    pub(crate) external: Setting<Vec<Multiaddr>>,
    pub(crate) send_timeout: Setting<Duration>,
    /// None: chosen by -v.
    pub(crate) log_level: Setting<Option<String>>,
}

/// Where `text` has its byte `offset`: the 1-based line.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .unwrap_or(text)
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The key set on 1-based line `line` of `text`, if that line is `key = …`.
fn key_on_line(text: &str, line: usize) -> Option<&str> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = l.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(key)
}

fn bad_file(file: &Path, line: Option<usize>, problem: impl fmt::Display) -> Failure {
    let at = match line {
        Some(l) => format!("{}, line {l}", file.display()),
        None => file.display().to_string(),
    };
    Failure::new(
        BAD_CONFIG,
        "bad_config",
        format!("bad configuration in {at}: {problem}"),
    )
}

fn bad_env(var: &str, problem: impl fmt::Display) -> Failure {
    Failure::new(USAGE, "invalid_input", format!("bad {var}: {problem}"))
}

fn multiaddrs_from_file(
    file: &Path,
    text: &str,
    items: Vec<Spanned<String>>,
    key: &str,
) -> Result<Vec<Multiaddr>, Failure> {
    items
        .into_iter()
        .map(|s| {
            let line = line_of(text, s.span().start);
            s.get_ref().parse::<Multiaddr>().map_err(|e| {
                bad_file(
                    file,
                    Some(line),
                    format!("`{}` in `{key}` is not a multiaddr ({e})", s.get_ref()),
                )
            })
        })
        .collect()
}

fn multiaddrs_from_env(var: &str) -> Result<Option<Vec<Multiaddr>>, Failure> {
    let Some(v) = std::env::var_os(var) else {
        return Ok(None);
    };
    let v = v
        .into_string()
        .map_err(|_| bad_env(var, "not valid UTF-8"))?;
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Multiaddr>()
                .map_err(|e| bad_env(var, format!("`{s}` is not a multiaddr ({e})")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn bool_from_env(var: &str) -> Result<Option<bool>, Failure> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "" | "0" | "false" | "no" | "off" => Ok(Some(false)),
            _ => Err(bad_env(var, format!("`{v}` is not true or false"))),
        },
    }
}

fn check_log_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| format!("`{filter}` is not a log filter ({e})"))
}

fn pick<T>(flag: Option<T>, env: Option<T>, file: Option<T>, default: T) -> Setting<T> {
    if let Some(value) = flag {
        Setting {
            value,
            source: Source::Flag,
        }
    } else if let Some(value) = env {
        Setting {
            value,
            source: Source::Env,
        }
    } else if let Some(value) = file {
        Setting {
            value,
            source: Source::File,
        }
    } else {
        Setting {
            value: default,
            source: Source::Default,
        }
    }
}

impl Settings {
    /// Read `HOME/meshchat.toml` (if it exists) and merge it with the environment and `flags`.
    pub(crate) fn load(
        home: &Path,
        flags: &NodeArgs,
        log_flag: Option<&str>,
    ) -> Result<Settings, Failure> {
        let file = home.join(FILE_NAME);
        let text = read_file(&file)?;
        let parsed: FileConfig = match &text {
            None => FileConfig::default(),
            Some(text) => toml::from_str(text).map_err(|e| {
                let line = e.span().map(|s| line_of(text, s.start));
                let problem = e.message().trim_end();
                match line.and_then(|l| key_on_line(text, l)) {
                    Some(key) if !problem.contains(&format!("`{key}`")) => {
                        bad_file(&file, line, format!("`{key}`: {problem}"))
                    }
                    _ => bad_file(&file, line, problem),
                }
            })?,
        };
        let text = text.unwrap_or_default();

        let file_listen = parsed
            .listen
            .map(|v| multiaddrs_from_file(&file, &text, v, "listen"))
            .transpose()?;
        let file_bootstrap = parsed
            .bootstrap
            .map(|v| multiaddrs_from_file(&file, &text, v, "bootstrap"))
            .transpose()?;
        let file_external = parsed
            .external
            .map(|v| multiaddrs_from_file(&file, &text, v, "external"))
            .transpose()?;
        let file_timeout = match parsed.send_timeout_secs {
            None => None,
            Some(s) if SEND_TIMEOUT_SECS.contains(s.get_ref()) => Some(*s.get_ref()),
            Some(s) => {
                return Err(bad_file(
                    &file,
                    Some(line_of(&text, s.span().start)),
                    format!(
                        "`send_timeout_secs` is {}; it must be between 1 and 240",
                        s.get_ref()
                    ),
                ))
            }
        };
        let file_log = match parsed.log_level {
            None => None,
            Some(s) => {
                check_log_filter(s.get_ref())
                    .map_err(|p| bad_file(&file, Some(line_of(&text, s.span().start)), p))?;
                Some(s.into_inner())
            }
        };

        let env_timeout = match std::env::var("MESHCHAT_SEND_TIMEOUT") {
            Err(_) => None,
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(n) if SEND_TIMEOUT_SECS.contains(&n) => Some(n),
                _ => {
                    return Err(bad_env(
                        "MESHCHAT_SEND_TIMEOUT",
                        format!("`{v}` is not a number of seconds between 1 and 240"),
                    ))
                }
            },
        };
        let env_log = match std::env::var("MESHCHAT_LOG").or_else(|_| std::env::var("RUST_LOG")) {
            Err(_) => None,
            Ok(v) if v.trim().is_empty() => None,
            Ok(v) => {
                check_log_filter(&v).map_err(|p| bad_env("MESHCHAT_LOG/RUST_LOG", p))?;
                Some(v)
            }
        };
        if let Some(l) = log_flag {
            check_log_filter(l).map_err(|p| bad_env("--log-level", p))?;
        }

        let non_empty = |v: &Vec<Multiaddr>| (!v.is_empty()).then(|| v.clone());
        Ok(Settings {
            listen: pick(
                non_empty(&flags.listen),
                multiaddrs_from_env("MESHCHAT_LISTEN")?,
                file_listen,
                Vec::new(),
            ),
            bootstrap: pick(
                non_empty(&flags.bootstrap),
                multiaddrs_from_env("MESHCHAT_BOOTSTRAP")?,
                file_bootstrap,
                Vec::new(),
            ),
            dht_server: pick(
                flags.dht_server.then_some(true),
                bool_from_env("MESHCHAT_DHT_SERVER")?,
                parsed.dht_server,
                false,
            ),
            lan_only: pick(
                flags.lan_only.then_some(true),
                bool_from_env("MESHCHAT_LAN_ONLY")?,
                parsed.lan_only,
                false,
            ),
            mdns: pick(
                flags.no_mdns.then_some(false),
                bool_from_env("MESHCHAT_MDNS")?,
                parsed.mdns,
                true,
            ),
            external: pick(
                non_empty(&flags.external),
                multiaddrs_from_env("MESHCHAT_EXTERNAL")?,
                file_external,
                Vec::new(),
            ),
            send_timeout: {
                let s = pick(
                    flags.send_timeout,
                    env_timeout,
                    file_timeout,
                    meshchat_node::config::DEFAULT_SEND_TIMEOUT.as_secs(),
                );
                Setting {
                    value: Duration::from_secs(s.value),
                    source: s.source,
                }
            },
            log_level: {
                let s = pick(
                    log_flag.map(str::to_owned),
                    env_log,
                    file_log,
                    String::new(),
                );
                Setting {
                    value: (!s.value.is_empty()).then_some(s.value),
                    source: s.source,
                }
            },
            file,
        })
    }

    /// The node configuration for this home.
    ///
    /// mDNS runs only when the node listens beyond loopback (a loopback-only node cannot be
    /// reached from the LAN, and tests on one machine must not find each other). A node with
    /// mDNS on and no bootstrap peers runs LAN-only: Kademlia server among the LAN's nodes.
    pub(crate) fn node_config(&self, home: &Path) -> NodeConfig {
        let mut config = NodeConfig::new(home.to_path_buf());
        if !self.listen.value.is_empty() {
            config.listen = self.listen.value.clone();
        }
        config.bootstrap = self.bootstrap.value.clone();
        config.dht_server = self.dht_server.value;
        config.external = self.external.value.clone();
        config.mdns = self.mdns.value && config.listen.iter().any(|a| !is_loopback(a));
        config.lan_only = self.lan_only.value || (config.mdns && config.bootstrap.is_empty());
        config.send_timeout = self.send_timeout.value;
        config
    }

    /// `meshchat config --json`.
    pub(crate) fn to_json(&self) -> Value {
        let strings = |v: &[Multiaddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        json!({
            "file": self.file.display().to_string(),
            "file_exists": self.file.exists(),
            "listen": strings(&self.listen.value),
            "bootstrap": strings(&self.bootstrap.value),
            "dht_server": self.dht_server.value,
            "lan_only": self.lan_only.value,
            "mdns": self.mdns.value,
            "external": strings(&self.external.value),
            "send_timeout_secs": self.send_timeout.value.as_secs(),
            "log_level": self.log_level.value,
            "sources": {
                "listen": self.listen.source.to_string(),
                "bootstrap": self.bootstrap.source.to_string(),
                "dht_server": self.dht_server.source.to_string(),
                "lan_only": self.lan_only.source.to_string(),
                "mdns": self.mdns.source.to_string(),
                "external": self.external.source.to_string(),
                "send_timeout_secs": self.send_timeout.source.to_string(),
                "log_level": self.log_level.source.to_string(),
            },
        })
    }

    /// `meshchat config`.
    pub(crate) fn to_text(&self) -> String {
        let list = |v: &[Multiaddr], empty: &str| {
            if v.is_empty() {
                empty.to_owned()
            } else {
                v.iter().map(|a| format!("\n    {a}")).collect::<String>()
            }
        };
        let exists = if self.file.exists() {
            ""
        } else {
            " (does not exist; defaults apply)"
        };
        format!(
            "configuration file: {}{exists}\n\
             listen ({}):{}\n\
             bootstrap ({}):{}\n\
             dht_server ({}): {}\n\
             lan_only ({}): {}{}\n\
             mdns ({}): {}\n\
             external ({}):{}\n\
             send_timeout_secs ({}): {}\n\
             log_level ({}): {}",
            self.file.display(),
            self.listen.source,
            list(
                &self.listen.value,
                " all interfaces, random TCP and QUIC ports"
            ),
            self.bootstrap.source,
            list(&self.bootstrap.value, " (none)"),
            self.dht_server.source,
            self.dht_server.value,
            self.lan_only.source,
            self.lan_only.value,
            if !self.lan_only.value && self.mdns.value && self.bootstrap.value.is_empty() {
                " (no bootstrap peers: runs LAN-only while mDNS finds its peers)"
            } else {
                ""
            },
            self.mdns.source,
            self.mdns.value,
            self.external.source,
            list(&self.external.value, " (none)"),
            self.send_timeout.source,
            self.send_timeout.value.as_secs(),
            self.log_level.source,
            self.log_level.value.as_deref().unwrap_or("(chosen by -v)"),
        )
    }
}

/// Whether `addr` listens on loopback only.
fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(libp2p::multiaddr::Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(libp2p::multiaddr::Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

fn read_file(file: &Path) -> Result<Option<String>, Failure> {
    use std::io::Read;
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad_file(file, None, format!("cannot read it ({e})"))),
    };
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad_file(file, None, format!("cannot read it as UTF-8 text ({e})")))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(bad_file(
            file,
            None,
            format!("it is larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(Some(text))
}

/// Write the commented template into a new home (never over an existing file).
pub(crate) fn write_template(home: &Path) -> std::io::Result<()> {
    use std::io::Write;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(home.join(FILE_NAME))
    {
        Ok(mut f) => f.write_all(TEMPLATE.as_bytes()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Add `addrs` to the file's `bootstrap` list (creating the file or the key if needed), keeping
/// its comments and layout. Addresses already listed are not repeated.
pub(crate) fn remember_bootstrap(file: &Path, addrs: &[Multiaddr]) -> Result<(), Failure> {
    if addrs.is_empty() {
        return Ok(());
    }
    let text = read_file(file)?.unwrap_or_else(|| TEMPLATE.to_owned());
    let mut doc = text
        .parse::<toml_edit::DocumentMut>()
        .map_err(|e| bad_file(file, None, e.to_string().trim_end()))?;
    let item = doc
        .entry("bootstrap")
        .or_insert_with(|| toml_edit::value(toml_edit::Array::new()));
    let Some(list) = item.as_array_mut() else {
        return Err(bad_file(
            file,
            None,
            "`bootstrap` is not a list of addresses",
        ));
    };
    let mut changed = false;
    for a in addrs {
        let a = a.to_string();
        if !list.iter().any(|v| v.as_str() == Some(a.as_str())) {
            list.push(a);
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, doc.to_string())
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| bad_file(file, None, format!("cannot write it ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }

    #[test]
    fn the_template_parses_and_sets_nothing() {
        let parsed: FileConfig = toml::from_str(TEMPLATE).expect("template parses");
        assert!(parsed.listen.is_none() && parsed.bootstrap.is_none());
        assert!(parsed.log_level.is_none() && parsed.send_timeout_secs.is_none());
        assert!(parsed.mdns.is_none() && parsed.external.is_none());
    }

    #[test]
    fn mdns_needs_a_listener_beyond_loopback_and_no_bootstrap_means_lan_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path();
        let config = |flags: &NodeArgs| {
            Settings::load(home, flags, None)
                .expect("settings")
                .node_config(home)
        };
        // Defaults: all interfaces, no bootstrap: mDNS on, LAN-only.
        let c = config(&NodeArgs::default());
        assert!(c.mdns && c.lan_only && c.force_dht_server());
        // Loopback only: no mDNS, so not LAN-only either.
        let c = config(&NodeArgs {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            ..NodeArgs::default()
        });
        assert!(!c.mdns && !c.lan_only);
        // A bootstrap peer: the internet as usual, LAN peers still found by mDNS.
        let c = config(&NodeArgs {
            bootstrap: vec![
                "/ip4/192.0.2.1/tcp/4001/p2p/12D3KooWBQ58zWXNYqJ5jiHWi5KiE5DHZXBwMN6zdzYpqFL7vQYq"
                    .parse()
                    .expect("addr"),
            ],
            ..NodeArgs::default()
        });
        assert!(c.mdns && !c.lan_only);
        // mDNS off: never LAN-only by itself, but `--lan-only` still is.
        let c = config(&NodeArgs {
            no_mdns: true,
            ..NodeArgs::default()
        });
        assert!(!c.mdns && !c.lan_only);
        let c = config(&NodeArgs {
            no_mdns: true,
            lan_only: true,
            external: vec!["/ip4/203.0.113.7/tcp/4001".parse().expect("addr")],
            ..NodeArgs::default()
        });
        assert!(!c.mdns && c.lan_only);
        assert_eq!(c.external.len(), 1);
    }

    #[test]
    fn remembering_keeps_comments_and_does_not_repeat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(FILE_NAME);
        std::fs::write(&file, "# mine\nlan_only = true\n").expect("write");
        let a: Multiaddr =
            "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWBQ58zWXNYqJ5jiHWi5KiE5DHZXBwMN6zdzYpqFL7vQYq"
                .parse()
                .expect("addr");
        remember_bootstrap(&file, std::slice::from_ref(&a)).expect("remember");
        remember_bootstrap(&file, std::slice::from_ref(&a)).expect("remember again");
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(text.starts_with("# mine\nlan_only = true\n"), "{text}");
        assert_eq!(text.matches(&a.to_string()).count(), 1, "{text}");
        let parsed: FileConfig = toml::from_str(&text).expect("still parses");
        assert_eq!(parsed.bootstrap.map(|v| v.len()), Some(1));
    }
}
