//! The command reader and parser: any bytes, split anywhere, give the same lines, stay within
//! the line limits and get a command or a refusal.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smtp_oauth_bridge::smtp::fuzz::command_input(data);
});
