#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nasbak_repo::fuzz_checks::check_backup_ref(data));
