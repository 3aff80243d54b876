//! aiw-agent: the first-boot agent of aiwimg images.
pub mod modes;
