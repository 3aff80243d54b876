//! aiwimg: builds immutable, verity-protected appliance OS images for the
//! nodes of an aiWARE Anywhere cluster. `pipeline::build` is the whole build.
pub mod cache;
pub mod gpt;
pub mod host;
pub mod image_ref;
pub mod inspect;
pub mod manifest;
pub mod openpgp;
pub mod outputs;
pub mod pipeline;
pub mod profile;
pub mod publish;
pub mod run;
pub mod secure_boot;
pub mod stages;
pub mod tools;
pub mod update;
pub mod verity;
