//! Download progress on a terminal: one indicatif bar per artifact (bytes, rate, ETA).
//! Only the CLI builds one, and only when stderr is a terminal and neither --json nor -q is set.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::apply::{Reporter, fetch};

pub struct Bars {
    multi: MultiProgress,
}

impl Bars {
    pub fn new() -> Self {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
        }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for Bars {
    fn artifact(&self, destination: &str) -> Box<dyn fetch::Progress> {
        let bar = self.multi.add(ProgressBar::hidden());
        bar.set_style(
            ProgressStyle::with_template("{prefix:40!} {bar:30} {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} eta {eta}")
                .expect("the template is valid"),
        );
        bar.set_prefix(destination.to_string());
        Box::new(Bar(bar))
    }
}

struct Bar(ProgressBar);

impl fetch::Progress for Bar {
    fn started(&self, _url: &str, total: Option<u64>, resumed_from: u64) {
        if let Some(total) = total {
            self.0.set_length(total);
        }
        self.0.set_position(resumed_from);
        self.0.reset_eta();
    }
    fn advanced(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finished(&self) {
        self.0.finish_and_clear();
    }
}
