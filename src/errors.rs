//! Error text shared by every layer: an error and its causes on one line. A leaf: imports nothing
//! of cvx, so the stages can report failures without reaching up to `render` or `cli`.

/// An error and its causes on one line, for per-action reports and logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}
