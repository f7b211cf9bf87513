//! The operator commands: each one request to the server's admin API, with the admin token, printed as a table
//! or (`--json`) as the API's own answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::tables::{date, describe_rollout, devices_table, format_tags, state_word, tokens_table};
use super::{
    AppCommand, Cli, Command, DEFAULT_DB, DeviceCommand, ReleaseCommand, RolloutCommand,
    ServerCliError, TokenCommand, admin_token_path,
};
use crate::agent::link::http_client;
use crate::clock::{Clock, SystemClock};
use crate::server::api;
use crate::server::views::{
    AppRequest, AppView, DeviceView, ReleaseRequest, ReleaseView, RolloutRequest, RolloutView,
    TagsRequest, TokenCreated, TokenRequest, TokenView,
};

/// `TAG=VALUE` pairs of a flag.
fn tag_pairs(flag: &str, pairs: &[String]) -> Result<BTreeMap<String, String>, ServerCliError> {
    let mut out = BTreeMap::new();
    for s in pairs {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| ServerCliError::Usage(format!("{flag} {s:?} is not TAG=VALUE")))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(cli: &Cli) -> Result<Client, ServerCliError> {
        let path = cli
            .token_file
            .clone()
            .unwrap_or_else(|| admin_token_path(Path::new(DEFAULT_DB)));
        let token = std::fs::read_to_string(&path)
            .map_err(|source| ServerCliError::NoToken {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_string();
        Ok(Client {
            http: http_client(cli.ca_bundle.as_deref(), Duration::from_secs(60))?,
            base: cli.server.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(T, serde_json::Value), ServerCliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b)
                .map_err(|e| ServerCliError::Usage(format!("cannot encode the request: {e}")))?;
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let unreachable = |e: reqwest::Error| ServerCliError::Unreachable {
            url: url.clone(),
            message: crate::error_chain(&e),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let text = resp.text().await.map_err(unreachable)?;
        if !status.is_success() {
            let message = serde_json::from_str::<api::ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(ServerCliError::Refused(format!("{status}: {message}")));
        }
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ServerCliError::Refused(format!("an answer that is not JSON: {e}")))?;
        let typed = serde_json::from_value(raw.clone()).map_err(|e| {
            ServerCliError::Refused(format!("an answer this CLI does not understand: {e}"))
        })?;
        Ok((typed, raw))
    }
}

const NONE: Option<&()> = None;

pub(super) async fn operate(cli: &Cli) -> Result<ExitCode, ServerCliError> {
    use reqwest::Method;
    let c = Client::new(cli)?;
    let print_json = |v: &serde_json::Value| {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    };
    match &cli.command {
        Command::Serve(_) => unreachable!("serve is handled by run"),
        Command::Token(TokenCommand::Create {
            expires,
            uses,
            tags,
            device_tags,
        }) => {
            let req = TokenRequest {
                expires_in: expires.0.map(|d| d.as_secs()),
                uses: uses.0,
                tags: tag_pairs("--tag", tags)?,
                device_tags: *device_tags,
            };
            let (t, raw): (TokenCreated, _) =
                c.call(Method::POST, "/v1/tokens", Some(&req)).await?;
            if cli.json {
                print_json(&raw);
            } else {
                // The secret alone on stdout, for `> token-file`; what it allows to stderr.
                println!("{}", t.token);
                eprintln!(
                    "token {}: {}, {}",
                    t.id,
                    match t.uses {
                        Some(n) => format!("{n} use(s)"),
                        None => "unlimited uses".into(),
                    },
                    match t.expires {
                        Some(e) => format!("expires {}", date(e)),
                        None => "never expires".into(),
                    }
                );
            }
        }
        Command::Token(TokenCommand::List) => {
            let (ts, raw): (Vec<TokenView>, _) = c.call(Method::GET, "/v1/tokens", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", tokens_table(&ts, SystemClock.unix_seconds()));
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            let (_, raw): (TokenView, _) = c
                .call(Method::POST, &format!("/v1/tokens/{id}/revoke"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("revoked token {id}");
            }
        }
        Command::Device(DeviceCommand::Tag { name, set, remove }) => {
            let req = TagsRequest {
                set: tag_pairs("TAG=VALUE", set)?,
                remove: remove.clone(),
            };
            let (d, raw): (DeviceView, _) = c
                .call(
                    Method::POST,
                    &format!("/v1/devices/{name}/tags"),
                    Some(&req),
                )
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("{}", crate::human::inert(&format_tags(&d.tags)));
            }
        }
        Command::App(app) => match &**app {
            AppCommand::Create { name, settings } => {
                let settings = settings
                    .settings(false)
                    .map_err(|e| ServerCliError::Usage(e.to_string()))?;
                let req = AppRequest {
                    name: name.clone(),
                    settings,
                };
                let (a, raw): (AppView, _) = c.call(Method::POST, "/v1/apps", Some(&req)).await?;
                if cli.json {
                    print_json(&raw);
                } else {
                    println!("{}", a.name);
                }
            }
            AppCommand::List => {
                let (apps, raw): (Vec<AppView>, _) = c.call(Method::GET, "/v1/apps", NONE).await?;
                if cli.json {
                    print_json(&raw);
                } else {
                    let rows: Vec<[String; 2]> = apps
                        .iter()
                        .map(|a| [a.name.clone(), a.settings.restart.to_string()])
                        .collect();
                    print!("{}", crate::cli::table(["APP", "RESTART"], &rows));
                }
            }
        },
        Command::Release(ReleaseCommand::Create { app, image }) => {
            let req = ReleaseRequest {
                app: app.clone(),
                image: image.clone(),
            };
            let (r, raw): (ReleaseView, _) =
                c.call(Method::POST, "/v1/releases", Some(&req)).await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("{}", r.id);
                for (platform, digest) in &r.manifests {
                    eprintln!("  {platform}  {digest}");
                }
            }
        }
        Command::Release(ReleaseCommand::List) => {
            let (rs, raw): (Vec<ReleaseView>, _) =
                c.call(Method::GET, "/v1/releases", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                let rows: Vec<[String; 4]> = rs
                    .iter()
                    .map(|r| {
                        [
                            r.id.clone(),
                            r.app.clone(),
                            r.image.clone(),
                            r.manifests.keys().cloned().collect::<Vec<_>>().join(", "),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::cli::table(["RELEASE", "APP", "IMAGE", "PLATFORMS"], &rows)
                );
            }
        }
        Command::Rollout(RolloutCommand::Start {
            release,
            select,
            waves,
            counts,
            max_failures,
            soak,
            no_rollback,
            device_timeout,
            skip_timed_out,
        }) => {
            let mut selector = BTreeMap::new();
            for s in select {
                let (k, v) = s.split_once('=').ok_or_else(|| {
                    ServerCliError::Usage(format!("--select {s:?} is not TAG=VALUE"))
                })?;
                selector.insert(k.to_string(), v.to_string());
            }
            let waves = waves
                .iter()
                .map(|w| {
                    let w = w.trim();
                    if *counts || w.ends_with('%') {
                        w.to_string()
                    } else {
                        format!("{w}%")
                    }
                })
                .collect();
            let req = RolloutRequest {
                release: release.clone(),
                select: selector,
                waves,
                max_failures: max_failures.clone(),
                soak_secs: soak.as_secs(),
                rollback: !no_rollback,
                device_timeout_secs: device_timeout.as_secs(),
                skip_timed_out: *skip_timed_out,
            };
            let (r, raw): (RolloutView, _) =
                c.call(Method::POST, "/v1/rollouts", Some(&req)).await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("{}", r.id);
            }
        }
        Command::Rollout(RolloutCommand::Status { id }) => {
            let (r, raw): (RolloutView, _) = c
                .call(Method::GET, &format!("/v1/rollouts/{id}"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", describe_rollout(&r));
            }
        }
        Command::Rollout(RolloutCommand::List) => {
            let (rs, raw): (Vec<RolloutView>, _) =
                c.call(Method::GET, "/v1/rollouts", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                let rows: Vec<[String; 4]> = rs
                    .iter()
                    .map(|r| {
                        [
                            r.id.to_string(),
                            r.spec.release.clone(),
                            state_word(&r.status),
                            format!("{}/{}", r.waves_started, r.waves.len()),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::cli::table(["ID", "RELEASE", "STATE", "WAVES"], &rows)
                );
            }
        }
        Command::Rollout(RolloutCommand::Pause { id })
        | Command::Rollout(RolloutCommand::Resume { id })
        | Command::Rollout(RolloutCommand::Abort { id })
        | Command::Rollout(RolloutCommand::Retry { id }) => {
            let action = match &cli.command {
                Command::Rollout(RolloutCommand::Pause { .. }) => "pause",
                Command::Rollout(RolloutCommand::Resume { .. }) => "resume",
                Command::Rollout(RolloutCommand::Retry { .. }) => "retry",
                _ => "abort",
            };
            let (r, raw): (RolloutView, _) = c
                .call(Method::POST, &format!("/v1/rollouts/{id}/{action}"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", describe_rollout(&r));
            }
        }
        Command::Devices => {
            let (ds, raw): (Vec<DeviceView>, _) = c.call(Method::GET, "/v1/devices", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", devices_table(&ds, SystemClock.unix_seconds()));
            }
        }
        Command::Revoke { name } => {
            let (_, raw): (serde_json::Value, _) = c
                .call(Method::POST, &format!("/v1/devices/{name}/revoke"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("revoked {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
