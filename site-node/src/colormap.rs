//! The jet colour map, as SWE scanners and Grad-CAM overlays use it: 0 → blue, 1 → red.

/// RGB in [0, 1] for `t` in [0, 1] (clamped).
pub fn jet(t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    [(1.5 - (4.0 * t - 3.0).abs()).clamp(0.0, 1.0), (1.5 - (4.0 * t - 2.0).abs()).clamp(0.0, 1.0), (1.5 - (4.0 * t - 1.0).abs()).clamp(0.0, 1.0)]
}
