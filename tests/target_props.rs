//! Property tests of the target parser: any string at all gives a target or
//! a typed error that names the input, never a panic.

use healthlb::{ErrorKind, Target};
use proptest::prelude::*;

fn check(input: &str, default_port: Option<u16>) -> Result<(), TestCaseError> {
    match Target::parse(input, default_port) {
        Ok(target) => {
            prop_assert_eq!(target.as_str(), input);
            // What parsed renders a usable authority.
            let _ = target.authority();
        }
        Err(err) => {
            prop_assert_eq!(err.kind(), ErrorKind::InvalidTarget);
            prop_assert!(
                err.to_string()
                    .starts_with(&format!("invalid target {input:?}: ")),
                "{}",
                err
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn any_string(input in any::<String>()) {
        check(&input, None)?;
        check(&input, Some(443))?;
    }

    #[test]
    fn target_shaped_strings(
        input in "(dns:|ipv4:|ipv6:|srv:|unix:)?(//[a-z0-9.:\\[\\]]{0,24}/)?[a-z0-9_.:\\-\\[\\],%]{0,80}"
    ) {
        check(&input, None)?;
        check(&input, Some(443))?;
    }

    #[test]
    fn address_lists(parts in proptest::collection::vec("[0-9.:\\[\\]a-f]{0,24}", 0..12)) {
        check(&format!("ipv4:{}", parts.join(",")), None)?;
        check(&format!("ipv6:{}", parts.join(",")), None)?;
    }
}
