//! Checksum lists (`ImageSource.checksumURL`): `sha256sum`'s format, as
//! distributions publish next to their images (`SHA256SUMS`), and the BSD
//! format (`SHA256 (name) = <hex>`, `sha256sum --tag`).

/// The file name an image URL names: its last path segment, without a
/// query or fragment.
pub fn file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// The sha256 (64 lowercase hex digits) `list` gives for the file `name`.
/// A line naming a path matches by its last segment (`./x/name`).
pub fn lookup(list: &str, name: &str) -> Result<String, String> {
    let mut found: Option<String> = None;
    let mut seen = Vec::new();
    for line in list.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sum, file)) = parse_line(line) else {
            continue;
        };
        let last = file.rsplit('/').next().unwrap_or(file);
        if last != name {
            if seen.len() < 5 {
                seen.push(last.to_string());
            }
            continue;
        }
        if sum.len() != 64 {
            return Err(format!(
                "its line for {name} holds a {}-digit sum: only SHA-256 sums (64 hex digits, a SHA256SUMS list) are read",
                sum.len()
            ));
        }
        let sum = sum.to_ascii_lowercase();
        match &found {
            Some(f) if *f != sum => {
                return Err(format!("it gives {name} two different sums"));
            }
            _ => found = Some(sum),
        }
    }
    found.ok_or_else(|| {
        if seen.is_empty() {
            format!("no line for {name}: the list holds no sums")
        } else {
            format!("no line for {name} (it lists {})", seen.join(", "))
        }
    })
}

/// `(hex sum, file)` of one line in either format; `None`: not a sum line.
fn parse_line(line: &str) -> Option<(&str, &str)> {
    if let Some(rest) = line
        .strip_prefix("SHA256 (")
        .or_else(|| line.strip_prefix("SHA512 ("))
    {
        let (file, sum) = rest.rsplit_once(") = ")?;
        return is_hex(sum).then_some((sum, file));
    }
    let (sum, file) = line.split_once(char::is_whitespace)?;
    // `<sum>  <file>` (text mode) or `<sum> *<file>` (binary mode).
    let file = file.trim_start();
    let file = file.strip_prefix('*').unwrap_or(file);
    (is_hex(sum) && !file.is_empty()).then_some((sum, file))
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "cda90df26c595d825fa85d2c6211822bc595e7594631dbc763627c191b8b91cd";
    const B: &str = "c7256bdb1f0951055947894ec9e578bc6499ba78bd82f5f1c7f9d1e13bf34ddc";

    #[test]
    fn the_file_name_of_a_url() {
        assert_eq!(
            file_name("file:///var/lib/yukumo/images/t.qcow2"),
            "t.qcow2"
        );
        assert_eq!(
            file_name("https://cloud.example/debian/12/d.qcow2?x=1#f"),
            "d.qcow2"
        );
    }

    #[test]
    fn a_sha256sum_list_in_either_mode_and_the_bsd_format() {
        let list = format!(
            "# published\n{B}  other.qcow2\n{A} *./12/disk.qcow2\nSHA256 (bsd.raw) = {}\n",
            B.to_uppercase()
        );
        assert_eq!(lookup(&list, "disk.qcow2").unwrap(), A);
        assert_eq!(lookup(&list, "other.qcow2").unwrap(), B);
        assert_eq!(lookup(&list, "bsd.raw").unwrap(), B, "lowercased");
    }

    #[test]
    fn refusals_say_why() {
        let list = format!("{A}  one.qcow2\n{B}  two.qcow2\n");
        let e = lookup(&list, "three.qcow2").unwrap_err();
        assert_eq!(e, "no line for three.qcow2 (it lists one.qcow2, two.qcow2)");
        assert!(lookup("", "x").unwrap_err().contains("holds no sums"));
        assert!(
            lookup("<html>not found</html>", "x")
                .unwrap_err()
                .contains("holds no sums")
        );
        let sha512 = format!("{A}{A}  big.qcow2\n");
        let e = lookup(&sha512, "big.qcow2").unwrap_err();
        assert!(e.contains("128-digit sum: only SHA-256"), "{e}");
        let twice = format!("{A}  d.qcow2\n{B}  d.qcow2\n");
        assert_eq!(
            lookup(&twice, "d.qcow2").unwrap_err(),
            "it gives d.qcow2 two different sums"
        );
        let same_twice = format!("{A}  d.qcow2\n{A}  ./d.qcow2\n");
        assert_eq!(lookup(&same_twice, "d.qcow2").unwrap(), A);
    }
}
