#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nasbak_qemu_img::fuzz_checks::check_image_location(data));
