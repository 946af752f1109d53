//! XDR (RFC 4506) as libvirt's remote protocol uses it: big-endian 4-byte
//! units, strings and variable opaques with a length and padding, optional
//! values as a boolean and the value.

use super::Error;

/// Bytes being encoded.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A variable-length opaque (or a string): length, bytes, padding.
    pub fn opaque(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self.0.resize(self.0.len() + pad(v.len()), 0);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.opaque(v.as_bytes())
    }
    /// A fixed-length opaque (a UUID).
    pub fn fixed(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self.0.resize(self.0.len() + pad(v.len()), 0);
        self
    }
    /// An optional string (`remote_string`).
    pub fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.u32(1).str(s),
            None => self.u32(0),
        }
    }
}

fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Bytes being decoded; every read checks the length.
pub struct Dec<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| Error::protocol("a reply ends early"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub fn i32(&mut self) -> Result<i32, Error> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn bool(&mut self) -> Result<bool, Error> {
        Ok(self.i32()? != 0)
    }
    pub fn opaque(&mut self) -> Result<Vec<u8>, Error> {
        let n = self.u32()? as usize;
        let v = self.take(n)?.to_vec();
        self.take(pad(n))?;
        Ok(v)
    }
    pub fn string(&mut self) -> Result<String, Error> {
        String::from_utf8(self.opaque()?).map_err(|_| Error::protocol("a string is not UTF-8"))
    }
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let v: [u8; N] = self.take(N)?.try_into().expect("N bytes");
        self.take(pad(N))?;
        Ok(v)
    }
    pub fn opt_string(&mut self) -> Result<Option<String>, Error> {
        if self.bool()? {
            self.string().map(Some)
        } else {
            Ok(None)
        }
    }
    /// A variable-length array's count, bounded by what is left to read
    /// (every element takes at least 4 bytes), so a bad count cannot make
    /// the caller allocate without limit.
    pub fn count(&mut self) -> Result<usize, Error> {
        let n = self.u32()? as usize;
        if n > (self.buf.len() - self.at) / 4 {
            return Err(Error::protocol("an array is longer than its reply"));
        }
        Ok(n)
    }
    pub fn skip(&mut self, n: usize) -> Result<(), Error> {
        self.take(n).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded_and_read_back() {
        let mut e = Enc::default();
        e.str("abcde")
            .i32(-2)
            .u64(1 << 40)
            .opt_str(None)
            .opt_str(Some(""));
        assert_eq!(&e.0[..12], b"\0\0\0\x05abcde\0\0\0");
        let mut d = Dec::new(&e.0);
        assert_eq!(d.string().unwrap(), "abcde");
        assert_eq!(d.i32().unwrap(), -2);
        assert_eq!(d.u64().unwrap(), 1 << 40);
        assert_eq!(d.opt_string().unwrap(), None);
        assert_eq!(d.opt_string().unwrap(), Some(String::new()));
        assert!(d.i32().is_err(), "reading past the end is an error");
    }

    #[test]
    fn a_lying_length_is_an_error_not_an_allocation() {
        let mut e = Enc::default();
        e.u32(u32::MAX);
        assert!(Dec::new(&e.0).opaque().is_err());
        assert!(Dec::new(&e.0).count().is_err());
    }
}
