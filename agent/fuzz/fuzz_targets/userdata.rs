#![no_main]
//! The user-data parser must never panic or hang, whatever it is given.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(u) = aiw_agent::userdata::parse(data) {
        let s = aiw_agent::settings::Settings::from_user_data(u, None);
        let _ = aiw_agent::settings::validate(&s, &aiw_agent::settings::ImageContext { table: None, image: None });
        let _ = s.redacted_json();
    }
});
