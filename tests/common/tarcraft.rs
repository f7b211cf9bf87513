//! Tar streams written header by header, for the layers the `tar` crate's builder refuses to make (`..`,
//! absolute paths, PAX sizes that disagree with the ustar header, whiteouts of the root).

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    assert!(
        text.len() <= digits,
        "{value} does not fit a {digits}-digit field"
    );
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

/// One 512-byte ustar header. `size` is what the header declares, whatever data follows.
pub fn header(path: &[u8], kind: u8, link: &[u8], size: u64, mode: u32, mtime: u64) -> [u8; 512] {
    assert!(
        path.len() <= 100 && link.len() <= 100,
        "names longer than 100 bytes need PAX"
    );
    let mut h = [0u8; 512];
    h[..path.len()].copy_from_slice(path);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0);
    octal(&mut h[337..345], 0);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

fn pad(buf: &mut Vec<u8>) {
    let rem = buf.len() % 512;
    if rem != 0 {
        buf.resize(buf.len() + 512 - rem, 0);
    }
}

/// A PAX record: `"<len> <key>=<value>\n"`, where the length counts itself.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    assert_eq!(out.len(), len);
    out
}

#[derive(Default)]
pub struct RawTar {
    buf: Vec<u8>,
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar::default()
    }

    /// A header declaring `size`, followed by `data` (which may be longer or shorter), padded to a block.
    pub fn raw(&mut self, path: &str, kind: u8, link: &str, size: u64, data: &[u8]) -> &mut RawTar {
        self.buf.extend_from_slice(&header(
            path.as_bytes(),
            kind,
            link.as_bytes(),
            size,
            0o644,
            1_000_000,
        ));
        self.buf.extend_from_slice(data);
        pad(&mut self.buf);
        self
    }

    /// An entry without content, with `mode`: for checking that a mode never reaches past a symlink.
    pub fn raw_mode(&mut self, path: &str, kind: u8, link: &str, mode: u32) -> &mut RawTar {
        self.buf.extend_from_slice(&header(
            path.as_bytes(),
            kind,
            link.as_bytes(),
            0,
            mode,
            1_000_000,
        ));
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut RawTar {
        self.raw(path, b'0', "", data.len() as u64, data)
    }

    pub fn dir(&mut self, path: &str) -> &mut RawTar {
        self.raw(path, b'5', "", 0, b"")
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut RawTar {
        self.raw(path, b'2', target, 0, b"")
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut RawTar {
        self.raw(path, b'1', target, 0, b"")
    }

    /// A PAX extended header ('x') for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut RawTar {
        let body: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        self.raw("PaxHeaders/x", b'x', "", body.len() as u64, &body)
    }

    /// The stream with its two zero blocks.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        out.resize(out.len() + 1024, 0);
        out
    }
}
