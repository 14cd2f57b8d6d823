//! The user ID as a QR code in the terminal (`meshchat id --qr`): two rows of modules per text
//! line with Unicode half blocks, dark modules on a light background, with the standard quiet
//! zone of four modules. See `docs/cli.md`, section "id".

use qrcode::{Color, EcLevel, QrCode};

/// Light modules around the code, on every side (the QR standard asks for four).
pub(crate) const QUIET_ZONE: usize = 4;

/// Why a text cannot be drawn as a QR code.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw a QR code: {0}")]
pub(crate) struct QrError(#[from] qrcode::types::QrError);

/// `text` as lines of half blocks. With `ansi`, every line sets black on bright white, so that
/// the code is dark on light whatever the terminal's colours; without, a drawn glyph is a dark
/// module and a space a light one (for dark text on a light page or terminal).
pub(crate) fn render(text: &str, ansi: bool) -> Result<String, QrError> {
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)?;
    let width = code.width();
    let colors = code.to_colors();
    let full = width + 2 * QUIET_ZONE;
    let dark = |x: usize, y: usize| -> bool {
        if x < QUIET_ZONE || y < QUIET_ZONE || x >= width + QUIET_ZONE || y >= width + QUIET_ZONE {
            return false;
        }
        colors[(y - QUIET_ZONE) * width + (x - QUIET_ZONE)] == Color::Dark
    };
    let mut out = String::with_capacity(full * (full / 2 + 1) * 4);
    for row in (0..full).step_by(2) {
        if ansi {
            out.push_str("\x1b[30;107m");
        }
        for x in 0..full {
            let top = dark(x, row);
            let bottom = row + 1 < full && dark(x, row + 1);
            out.push(match (top, bottom) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        if ansi {
            out.push_str("\x1b[0m");
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_module_rows_per_line_with_a_quiet_zone() {
        let id = "mc1fkfadwl7jeuww9u4vl5kmlwtwuh7gc6z84ykphzqtj2pkk4ekuzsf86gax";
        let text = render(id, false).expect("renders");
        let code = QrCode::with_error_correction_level(id.as_bytes(), EcLevel::M).expect("code");
        let full = code.width() + 2 * QUIET_ZONE;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), full.div_ceil(2));
        for l in &lines {
            assert_eq!(l.chars().count(), full);
        }
        // The quiet zone: the first two lines and the first four columns are blank.
        assert!(lines[0].chars().all(|c| c == ' ') && lines[1].chars().all(|c| c == ' '));
        assert!(lines
            .iter()
            .all(|l| l.chars().take(QUIET_ZONE).all(|c| c == ' ')));
        // The top-left finder pattern starts at module (4, 4): its top edge is dark.
        assert_eq!(lines[2].chars().nth(QUIET_ZONE), Some('█'));
        let ansi = render(id, true).expect("renders");
        assert!(ansi
            .lines()
            .all(|l| l.starts_with("\x1b[30;107m") && l.ends_with("\x1b[0m")));
    }
}
