//! The DATA framer, the SMTP smuggling defence: the output never holds an end of data the
//! framer did not report, never has a bare CR or LF, and does not depend on how the input
//! was split.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smtp_oauth_bridge::smtp::fuzz::data_framer(data);
});
