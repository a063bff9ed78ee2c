//! Aligned columns for the client commands' text output (`comfy-table`, without borders or
//! colour, so it reads the same in a terminal, a pipe and a log).

use comfy_table::{Table, presets};

/// `header` over `rows`, each column as wide as its widest cell and two spaces apart.
pub fn table<R: IntoIterator<Item = String>>(header: &[&str], rows: impl IntoIterator<Item = R>) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header(header.to_vec());
    for row in rows {
        table.add_row(row.into_iter().collect::<Vec<_>>());
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
        .lines()
        .map(|line| line.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up_without_trailing_space() {
        let rows = [["a", "long value", "x"], ["longer key", "v", ""]].map(|r| r.map(String::from));
        let text = super::table(&["key", "value", "source"], rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let column = |line: &str, word: &str| line.find(word).unwrap();
        assert_eq!(column(lines[0], "value"), column(lines[1], "long value"), "{text}");
        assert_eq!(column(lines[0], "value"), column(lines[2], "v"), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text:?}");
    }
}
