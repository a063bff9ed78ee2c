//! Whether output may be decorated (ANSI colour, a progress bar redrawn in place): only on a
//! terminal, and never with `NO_COLOR` set to anything but empty (no-color.org), so logs,
//! pipes and CI keep plain lines.

use std::io::IsTerminal;

pub fn decorated(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
