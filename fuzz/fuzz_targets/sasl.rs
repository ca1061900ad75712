//! SASL PLAIN and LOGIN decoding and the server-side exchange: every input ends in
//! credentials, a challenge or a refusal with a 5xx reply, and credentials never show their
//! password in `Debug`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smtp_oauth_bridge::smtp::fuzz::sasl_exchange(data);
});
