//! `blkcheck-image IMAGE LAST_COMPLETED_PASS`: checks a disk image left by the blkcheck guest
//! (see `cpr_tests::blkcheck`): every sector of its region must hold the generation of the last
//! completed pass, or the next one. Exit status 0 if so, 1 if not, 2 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use cpr_tests::blkcheck::check_image;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, last] = args.as_slice() else {
        eprintln!("usage: blkcheck-image IMAGE LAST_COMPLETED_PASS");
        return ExitCode::from(2);
    };
    let Ok(last) = last.parse::<u64>() else {
        eprintln!("blkcheck-image: LAST_COMPLETED_PASS must be a number, not '{last}'");
        return ExitCode::from(2);
    };
    match check_image(&PathBuf::from(image), last) {
        Ok(s) => {
            println!(
                "blkcheck-image: ok: {} sectors, {} at generation {last}, {} at generation {}",
                s.region,
                s.last,
                s.next,
                last + 1
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blkcheck-image: {e}");
            ExitCode::FAILURE
        }
    }
}
