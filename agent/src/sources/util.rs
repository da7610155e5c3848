//! Small helpers shared by the file-reading sources: reading through a
//! configured root, following links in copied fixture trees, number parsing
//! that never overflows, device-name patterns and per-interval deltas.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{ParseError, SourceError};

/// Most files one `Files` keeps open; past it, files are opened per read.
const MAX_OPEN: usize = 256;

/// The files a source reads, kept open between cycles and re-read from
/// offset 0 with `pread`. A sysfs attribute or a proc file produces its
/// content afresh on every read from the start (as `top` relies on for
/// `/proc/stat`), so one or two system calls replace open, stat, read, read
/// and close. Files not read during a cycle are closed at its end (a device
/// that went away lets go of its files); a file whose read fails is reopened
/// once. (A tree of ordinary files, such as a fixture tree, is read the same
/// way: a file there must be rewritten in place to be seen changed; one
/// replaced by a rename is read from its old inode while it stays open.)
#[derive(Debug, Default)]
pub struct Files {
    /// Keyed by the path's bytes (hashing an `OsStr` is much cheaper than
    /// hashing a `Path` component by component).
    open: FastMap<std::ffi::OsString, (fs::File, bool)>,
    /// Read buffer, grown (and zeroed) only when a file needs more room;
    /// `len` bytes of it hold the last file read.
    buf: Vec<u8>,
    len: usize,
    /// Where [`Files::attr_in`] builds its paths.
    path: PathBuf,
}

impl Files {
    /// The whole file as text (borrowed from the read buffer unless it was
    /// not UTF-8); `Ok(None)` when it does not exist.
    pub fn read(&mut self, path: &Path) -> Result<Option<Cow<'_, str>>, SourceError> {
        match self.read_bytes(path, false) {
            Ok(Some(())) => Ok(Some(text(&self.buf[..self.len]))),
            Ok(None) => Ok(None),
            Err(e) => Err(SourceError::Failed(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// A sysfs attribute, trimmed; `None` when absent or unreadable (many
    /// attributes refuse reads in some device states: `speed` of a link that
    /// is down answers EINVAL, which is not an error of the source).
    /// Borrowed from the read buffer unless it was not UTF-8.
    pub fn attr(&mut self, path: &Path) -> Option<Cow<'_, str>> {
        match self.read_bytes(path, true) {
            Ok(Some(())) => Some(trimmed(&self.buf[..self.len])),
            _ => None,
        }
    }

    /// [`Files::attr`] of `dir/name`, the path built in a buffer kept for
    /// it; borrowed from the read buffer unless it was not UTF-8.
    pub fn attr_in(&mut self, dir: &Path, name: &str) -> Option<Cow<'_, str>> {
        let mut path = std::mem::take(&mut self.path).into_os_string();
        path.clear();
        path.push(dir.as_os_str());
        path.push("/");
        path.push(name);
        let path = PathBuf::from(path);
        let read = self.read_bytes(&path, true);
        self.path = path;
        match read {
            Ok(Some(())) => Some(trimmed(&self.buf[..self.len])),
            _ => None,
        }
    }

    /// Closes the files that were not read since the last call.
    pub fn end_cycle(&mut self) {
        self.open.retain(|_, (_, used)| std::mem::take(used));
    }

    /// Reads `path` into `self.buf`. `attr`: a sysfs attribute, whose whole
    /// content (at most a page) comes in one read.
    fn read_bytes(&mut self, path: &Path, attr: bool) -> io::Result<Option<()>> {
        if let Some((file, used)) = self.open.get_mut(path.as_os_str()) {
            *used = true;
            if let Ok(n) = read_all_at(file, &mut self.buf, attr) {
                self.len = n;
                return Ok(Some(()));
            }
            // Replaced or gone since the last cycle: open it again.
            self.open.remove(path.as_os_str());
        }
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.len = read_all_at(&file, &mut self.buf, attr)?;
        if self.open.len() < MAX_OPEN {
            self.open.insert(path.as_os_str().to_owned(), (file, true));
        }
        Ok(Some(()))
    }
}

/// The text of an attribute without surrounding whitespace.
fn trimmed(bytes: &[u8]) -> Cow<'_, str> {
    match text(bytes) {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
        Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
    }
}

/// Bytes as text: borrowed when they are UTF-8 (checked on the fast path
/// first), else with U+FFFD for what is not.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// FNV-1a: the maps of this module are keyed by paths, names and labels of
/// this host, not by anything an attacker picks, so they need no SipHash
/// and its cost on every lookup.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// A `HashMap` with [`Fnv`].
pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// Reads a file from offset 0 to its end into the start of `buf`; returns
/// how many bytes it has. `attr`: a sysfs attribute, whole in one read when
/// shorter than the room given (at most a page).
fn read_all_at(file: &fs::File, buf: &mut Vec<u8>, attr: bool) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    const MIN_ROOM: usize = 8 << 10;
    let mut len = 0;
    loop {
        if buf.len() < len + MIN_ROOM {
            buf.resize((len + MIN_ROOM).max(buf.len() * 2), 0);
        }
        let room = buf.len() - len;
        let n = match file.read_at(&mut buf[len..], len as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n;
        if n == 0 || (attr && n < room) {
            return Ok(len);
        }
    }
}

/// The subdirectories of a directory as (name, path), sorted by name
/// (the entry types come with the listing: no stat per entry).
pub fn subdirs(path: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether an I/O error means "this file is not there" rather than a failure.
pub fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    ) || e.raw_os_error() == Some(20) // ENOTDIR on toolchains without the kind
}

/// Resolves `path` to a directory, following a symbolic link the normal way,
/// or a *link stub*: a small regular file whose whole content is the link's
/// relative target (what a tree copied without symlink support, such as a git
/// checkout with `core.symlinks=false`, holds where the original had a link;
/// the fixture trees have `proc/self` → `10` and `sys/class/net/eth0` →
/// `../../devices/...` stored that way). Follows at most a few stubs, so a
/// cycle of stubs cannot loop.
pub fn resolve_dir(path: &Path) -> Option<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..4 {
        let meta = fs::metadata(&current).ok()?;
        if meta.is_dir() {
            return Some(current);
        }
        if !meta.is_file() || meta.len() == 0 || meta.len() > 1024 {
            return None;
        }
        let target = fs::read_to_string(&current).ok()?;
        let target = target.trim_end_matches('\n');
        // A link target is a relative path or a bare number (`self` → `10`);
        // anything else is an ordinary file that happens to be small.
        let looks_like_link = target.contains('/') || target.bytes().all(|b| b.is_ascii_digit());
        if target.is_empty()
            || !looks_like_link
            || target.contains(char::is_whitespace)
            || target.contains('\0')
            || target.starts_with('/')
        {
            return None;
        }
        current = current.parent()?.join(target);
    }
    None
}

/// Entries of a directory as (name, path), sorted by name. Names that are
/// not UTF-8 are kept lossily (label values must be strings).
pub fn list_dir(path: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Parses an unsigned decimal counter (up to 2^64 - 1).
pub fn parse_u64(field: &str, line: usize, what: &str) -> Result<u64, ParseError> {
    field.parse::<u64>().map_err(|_| {
        ParseError::new(
            line,
            format!("{what}: {field:?} is not an unsigned integer"),
        )
    })
}

/// Parses every whitespace-separated field of `text` as a u64 counter.
pub fn parse_u64_fields(text: &str, line: usize, what: &str) -> Result<Vec<u64>, ParseError> {
    text.split_whitespace()
        .map(|f| parse_u64(f, line, what))
        .collect()
}

/// A u64 counter as a sample value. Exact up to 2^53; above that the nearest
/// f64, which is what every Prometheus-compatible store keeps anyway.
pub fn f(v: u64) -> f64 {
    v as f64
}

/// Shell-style pattern match with `*` (any run, also empty) and `?` (one
/// character); everything else matches itself. Whole-name match.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Include/exclude device filter: a name passes when it matches an include
/// pattern (or the include list is empty) and matches no exclude pattern.
#[derive(Debug, Clone)]
pub struct NameFilter {
    include: Vec<String>,
    exclude: Vec<String>,
}

impl NameFilter {
    pub fn new(include: &[String], exclude: &[String]) -> Self {
        NameFilter {
            include: include.to_vec(),
            exclude: exclude.to_vec(),
        }
    }

    pub fn allows(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| glob_match(p, name)))
            && !self.exclude.iter().any(|p| glob_match(p, name))
    }
}

/// Remembers the previous value of counters so a source can report a ratio
/// over the last interval. Keys are whatever identifies the counter; a key
/// allocates once, when first seen.
#[derive(Debug, Default)]
pub struct Deltas {
    /// Per key: (the value of the last cycle, the value of this one).
    counters: FastMap<Box<str>, (Reading, Reading)>,
}

/// A counter's value and when it was read.
type Reading = Option<(u64, Instant)>;

impl Deltas {
    /// Records `value` for `key` at `now`; returns the increase since the
    /// previous cycle and the seconds between them, or `None` on the first
    /// sighting or when the counter went backwards (a reset).
    pub fn update(&mut self, key: &str, value: u64, now: Instant) -> Option<(u64, f64)> {
        let entry = match self.counters.get_mut(key) {
            Some(e) => e,
            None => self.counters.entry(key.into()).or_default(),
        };
        entry.1 = Some((value, now));
        let (prev, then) = entry.0?;
        let delta = value.checked_sub(prev)?;
        Some((delta, now.saturating_duration_since(then).as_secs_f64()))
    }

    /// Ends a cycle: counters not seen this cycle are forgotten.
    pub fn finish_cycle(&mut self) {
        self.counters.retain(|_, (prev, current)| {
            *prev = current.take();
            prev.is_some()
        });
    }
}

/// Values a source builds once per key and hands out as clones while the
/// key keeps being seen: metric names made at run time and label sets
/// (`vitals_common::model::{Name, LabelSet}`, whose clones are reference
/// counts). A key not used during a cycle is dropped at [`Interned::end_cycle`]
/// (a device that went away lets go of its labels). Looking up a `&str`
/// allocates nothing; only a new key does.
#[derive(Debug)]
pub struct Interned<V> {
    map: FastMap<Box<str>, (V, bool)>,
}

impl<V> Default for Interned<V> {
    fn default() -> Self {
        Interned {
            map: FastMap::default(),
        }
    }
}

impl<V: Clone> Interned<V> {
    /// The value for `key`, made by `make` the first time.
    pub fn get(&mut self, key: &str, make: impl FnOnce() -> V) -> V {
        if let Some((v, used)) = self.map.get_mut(key) {
            *used = true;
            return v.clone();
        }
        let v = make();
        self.map.insert(key.into(), (v.clone(), true));
        v
    }

    /// Forgets the keys not used since the last call.
    pub fn end_cycle(&mut self) {
        self.map.retain(|_, (_, used)| std::mem::take(used));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Interned<vitals_common::model::LabelSet> {
    /// The set of the label `pairs`, made the first time they are seen; the
    /// lookup key is built in `key` (a buffer kept to reuse its allocation).
    pub fn of_pairs<'a>(
        &mut self,
        key: &mut String,
        pairs: impl Iterator<Item = &'a (&'static str, &'a str)> + Clone,
    ) -> vitals_common::model::LabelSet {
        key.clear();
        for (k, v) in pairs.clone() {
            key.push_str(k);
            key.push('\0');
            key.push_str(v);
            key.push('\0');
        }
        self.get(key, || pairs.copied().collect())
    }
}

/// `part / whole` when `whole` is not zero.
pub fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Undoes the octal escapes (`\040` for a space) the kernel writes in mount
/// paths.
pub fn unescape_octal(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        let cases = [
            ("lo", "lo", true),
            ("lo", "lo0", false),
            ("veth*", "veth4B09XN", true),
            ("veth*", "eth0", false),
            ("docker*", "docker0", true),
            ("*", "", true),
            ("e?h0", "eth0", true),
            ("e?h0", "eh0", false),
            ("ens*f?", "ens1f0", true),
            ("*np*", "ens1f0np0", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("💩*", "💩0", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n), want, "{p} vs {n}");
        }
    }

    #[test]
    fn filter_include_then_exclude() {
        let f = NameFilter::new(&[], &["lo".into(), "veth*".into()]);
        assert!(f.allows("eth0"));
        assert!(!f.allows("lo"));
        assert!(!f.allows("veth123"));
        let f = NameFilter::new(&["ens*".into()], &["ens9".into()]);
        assert!(f.allows("ens1f0"));
        assert!(!f.allows("ens9"));
        assert!(!f.allows("eth0"));
    }

    #[test]
    fn deltas_skip_first_cycle_and_resets() {
        let mut d = Deltas::default();
        let t0 = Instant::now();
        assert_eq!(d.update("a", 100, t0), None);
        d.finish_cycle();
        let t1 = t0 + std::time::Duration::from_secs(2);
        assert_eq!(d.update("a", 150, t1), Some((50, 2.0)));
        d.finish_cycle();
        assert_eq!(
            d.update("a", 10, t1),
            None,
            "a counter reset is not a delta"
        );
        d.finish_cycle();
        d.finish_cycle();
        assert_eq!(
            d.update("a", 20, t1),
            None,
            "forgotten after a cycle unseen"
        );
    }

    #[test]
    fn u64_near_the_top_parses() {
        assert_eq!(parse_u64("18446744073709551615", 1, "x").unwrap(), u64::MAX);
        assert!(parse_u64("18446744073709551616", 1, "x").is_err());
        assert!(parse_u64("-1", 1, "x").is_err());
        assert_eq!(f(18446744073709537686), 1.8446744073709537e19);
    }

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape_octal(r"/mnt/my\040data"), "/mnt/my data");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
        assert_eq!(unescape_octal(r"/odd\04"), r"/odd\04");
        assert_eq!(unescape_octal(r"tab\011x"), "tab\tx");
    }

    #[test]
    fn files_are_reread_from_the_start_and_closed_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "one\n").unwrap();
        let mut files = Files::default();
        assert_eq!(files.read(&a).unwrap().as_deref(), Some("one\n"));
        assert_eq!(files.open.len(), 1);
        std::fs::write(&a, "two, longer\n").unwrap();
        assert_eq!(files.attr(&a).as_deref(), Some("two, longer"));
        // Larger than one read.
        let big = "x".repeat(100_000);
        std::fs::write(&a, &big).unwrap();
        assert_eq!(files.read(&a).unwrap().unwrap().len(), 100_000);
        files.end_cycle();
        assert_eq!(files.open.len(), 1, "read this cycle: kept");
        files.end_cycle();
        assert_eq!(files.open.len(), 0, "not read for a cycle: closed");
        assert_eq!(files.read(&dir.path().join("missing")).unwrap(), None);
        assert_eq!(files.attr(&dir.path().join("missing/x")), None);
        std::fs::write(&a, "three").unwrap();
        assert_eq!(files.read(&a).unwrap().as_deref(), Some("three"));
        std::fs::remove_file(&a).unwrap();
        // Still open: the unlinked file reads until the next cycle without it.
        files.end_cycle();
        files.end_cycle();
        assert_eq!(files.read(&a).unwrap(), None);
    }

    #[test]
    fn link_stubs_are_followed_and_cannot_loop() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("10")).unwrap();
        std::fs::write(dir.path().join("self"), "10").unwrap();
        assert_eq!(
            resolve_dir(&dir.path().join("self")).unwrap(),
            dir.path().join("10")
        );
        std::fs::write(dir.path().join("a"), "./b").unwrap();
        std::fs::write(dir.path().join("b"), "./a").unwrap();
        assert_eq!(resolve_dir(&dir.path().join("a")), None);
        std::fs::create_dir(dir.path().join("bond0")).unwrap();
        std::fs::write(dir.path().join("bonding_masters"), "bond0\n").unwrap();
        assert_eq!(resolve_dir(&dir.path().join("bonding_masters")), None);
        std::fs::write(dir.path().join("list"), "bond0 dmz int\n").unwrap();
        assert_eq!(resolve_dir(&dir.path().join("list")), None);
        assert_eq!(resolve_dir(&dir.path().join("missing")), None);
    }
}
