//! `flotilla images`: what the store holds.

use std::process::ExitCode;

use super::{CliError, Context};
use crate::store::{self, ImageEntry};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print a JSON array instead of a table
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let images = store::list_images(&ctx.state_dir)?;
    if args.json {
        let text = serde_json::to_string_pretty(&images).map_err(CliError::Json)?;
        println!("{text}");
    } else {
        print!("{}", table(&images));
    }
    Ok(ExitCode::SUCCESS)
}

fn table(images: &[ImageEntry]) -> String {
    let header = ["REFERENCE", "PLATFORM", "MANIFEST", "SIZE", "PULLED"];
    let rows: Vec<[String; 5]> = images
        .iter()
        .map(|i| {
            let digest = i.digest.to_string();
            [
                i.name.clone().unwrap_or_else(|| "<unnamed>".to_string()),
                i.platform.clone().unwrap_or_else(|| "-".to_string()),
                // sha256: plus 12 hex digits, as docker abbreviates image IDs.
                digest
                    .chars()
                    .take(digest.find(':').map_or(0, |c| c + 13))
                    .collect(),
                i.size.map_or_else(|| "-".to_string(), crate::human::bytes),
                i.pulled.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    super::table(header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_abbreviates_digests() {
        let entry = ImageEntry {
            name: Some("docker.io/library/alpine:3.20".to_string()),
            digest: crate::digest::Digest::sha256_of(b"m"),
            media_type: crate::oci::OCI_MANIFEST.to_string(),
            platform: Some("linux/arm/v6".to_string()),
            size: Some(3 << 20),
            pulled: Some("2025-01-31T12:00:00Z".to_string()),
            source: Some("alpine:3.20".to_string()),
            index_digest: None,
        };
        let text = table(&[entry]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("PLATFORM"), lines[1].find("linux/arm/v6"));
        assert!(lines[1].contains("sha256:"), "{text}");
        assert!(!lines[1].contains(&crate::digest::Digest::sha256_of(b"m").to_string()));
        assert!(lines[1].contains("3.0 MiB"));
    }
}
