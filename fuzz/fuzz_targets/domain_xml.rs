#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nasbak_libvirt::fuzz_checks::check_domain_xml(data));
