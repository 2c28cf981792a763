//! Cursor pagination: every list is ordered by id (time-ordered UUIDv7) and resumes after the
//! last id a page returned.

use crate::ValidationError;

/// How many items one page holds: 1 to 200, default 50.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit(u32);

impl PageLimit {
    pub const DEFAULT: u32 = 50;
    pub const MAX: u32 = 200;

    pub fn parse(value: Option<u32>) -> Result<Self, ValidationError> {
        match value {
            None => Ok(Self(Self::DEFAULT)),
            Some(n) if (1..=Self::MAX).contains(&n) => Ok(Self(n)),
            Some(_) => Err(ValidationError::new("limit", "must be between 1 and 200")),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for PageLimit {
    fn default() -> Self {
        Self(Self::DEFAULT)
    }
}

/// Opaque position after which the next page starts. On the wire it is the last item's sort key;
/// clients treat it as an opaque string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(String);

impl Cursor {
    /// Cursors are sort keys we issued: short, and made of characters ids and integers use.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValidationError::new("cursor", "is not a cursor this server issued"))
        }
    }

    pub fn from_key(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One page of a list and the cursor for the next page, if there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<Cursor>,
}

impl<T> Page<T> {
    /// Builds a page from `limit + 1` fetched rows: the extra row only says that more exist.
    pub fn from_overfetch(mut rows: Vec<T>, limit: PageLimit, key: impl Fn(&T) -> String) -> Self {
        let more = rows.len() > limit.get() as usize;
        rows.truncate(limit.get() as usize);
        let next_cursor = if more { rows.last().map(|r| Cursor::from_key(key(r))) } else { None };
        Self { items: rows, next_cursor }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page { items: self.items.into_iter().map(f).collect(), next_cursor: self.next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overfetch_sets_cursor_only_when_more_rows_exist() {
        let limit = PageLimit::parse(Some(2)).unwrap();
        let page = Page::from_overfetch(vec![1, 2, 3], limit, |n| n.to_string());
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next_cursor, Some(Cursor::from_key("2")));
        let page = Page::from_overfetch(vec![1, 2], limit, |n| n.to_string());
        assert_eq!(page.next_cursor, None);
    }

    #[test]
    fn limit_bounds() {
        assert!(PageLimit::parse(Some(0)).is_err());
        assert!(PageLimit::parse(Some(201)).is_err());
        assert_eq!(PageLimit::parse(None).unwrap().get(), 50);
    }

    #[test]
    fn cursor_rejects_injection() {
        assert!(Cursor::parse("x' OR 1=1").is_err());
        assert!(Cursor::parse("").is_err());
        assert!(Cursor::parse("0195f0a2-1b2c-7d3e-8f40-1234567890ab").is_ok());
    }
}
