//! The service config's parsing, section by section.

use std::time::Duration;

use tonic::Code;

use super::json::parse_duration;
use super::*;

#[test]
fn durations_are_proto3_json() {
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
    assert_eq!(
        parse_duration("0.000000001s"),
        Some(Duration::from_nanos(1))
    );
    for bad in ["1.5", "s", "-1s", "1.0000000001s", "1e3s", " 1s", "1.s5"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn the_first_supported_policy_wins() {
    let config = ServiceConfig::parse(
        r#"{"loadBalancingConfig": [{"pick_first": {}}, {"least_request_experimental": {"choiceCount": 3}}, {"round_robin": {}}]}"#,
    )
    .unwrap();
    assert_eq!(config.policy, Some(Policy::least_request(3)));
    assert_eq!(config.outlier_detection, None);
}

#[test]
fn outlier_detection_wraps_a_child_policy() {
    let config = ServiceConfig::parse(
        r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
            "interval": "5s", "baseEjectionTime": "10s", "maxEjectionPercent": 50,
            "failurePercentageEjection": {"threshold": 60, "minimumHosts": 2},
            "consecutiveFailures": {"threshold": 3},
            "failureCodes": ["UNAVAILABLE", 13],
            "childPolicy": [{"peak_ewma": {"decay": "2s", "slowStart": {"window": "20s"}}}]
        }}], "unknownField": {"ignored": true}}"#,
    )
    .unwrap();
    let od = config.outlier_detection.unwrap();
    assert_eq!(od.interval, Duration::from_secs(5));
    assert_eq!(od.max_ejection_percent, 50);
    assert_eq!(od.failure_percentage.unwrap().threshold, 60);
    assert_eq!(od.failure_percentage.unwrap().minimum_hosts, 2);
    assert_eq!(od.consecutive_failures.unwrap().threshold, 3);
    assert_eq!(od.success_rate, None);
    assert_eq!(od.failure_codes, vec![Code::Unavailable, Code::Internal]);
    assert!(matches!(
        config.policy,
        Some(Policy::PeakEwma { decay, .. }) if decay == Duration::from_secs(2)
    ));
    assert_eq!(config.slow_start.unwrap().window, Duration::from_secs(20));
}

#[test]
fn random_subsetting_wraps_a_child_policy_either_way_round() {
    let config = ServiceConfig::parse(
        r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 20,
            "childPolicy": [{"outlier_detection_experimental": {"interval": "5s",
                "childPolicy": [{"least_request_experimental": {}}]}}]}}]}"#,
    )
    .unwrap();
    assert_eq!(config.subset_size, Some(20));
    assert_eq!(config.policy, Some(Policy::least_request(2)));
    assert_eq!(
        config.outlier_detection.unwrap().interval,
        Duration::from_secs(5)
    );
    // Inside outlier detection, with A68's proto field names.
    let config = ServiceConfig::parse(
        r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
            "childPolicy": [{"random_subsetting": {"subset_size": 3,
                "child_policy": [{"round_robin": {}}]}}]}}]}"#,
    )
    .unwrap();
    assert_eq!(config.subset_size, Some(3));
    assert_eq!(config.policy, Some(Policy::RoundRobin));
    assert!(config.outlier_detection.is_some());
}

#[test]
fn method_config_is_kept_and_found_by_name() {
    let config = ServiceConfig::parse(
        r#"{"methodConfig": [
            {"name": [{"service": "echo.Echo", "method": "Unary"}], "timeout": "0.25s",
             "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.1s", "maxBackoff": "1s",
                             "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}},
            {"name": [{"service": "echo.Echo"}], "waitForReady": true,
             "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.05s"}},
            {"name": [{}], "timeout": "10s"}
        ], "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}"#,
    )
    .unwrap();
    let unary = config.method("echo.Echo", "Unary").unwrap();
    assert_eq!(unary.timeout, Some(Duration::from_millis(250)));
    assert_eq!(
        unary.retry_policy.as_ref().unwrap().max_attempts,
        5,
        "capped"
    );
    let stream = config.method("echo.Echo", "Bidi").unwrap();
    assert_eq!(stream.wait_for_ready, Some(true));
    assert_eq!(stream.hedging_policy.as_ref().unwrap().max_attempts, 3);
    let other = config.method("other.Service", "Call").unwrap();
    assert_eq!(other.timeout, Some(Duration::from_secs(10)));
    assert_eq!(config.retry_throttling.unwrap().max_tokens, 10);
}

#[test]
fn invalid_configs_name_the_field() {
    let cases = [
        ("[]", "the service config must be an object"),
        ("{", "is not JSON"),
        (
            r#"{"loadBalancingConfig": [{"least_request_experimental": {"choiceCount": 1}}]}"#,
            "loadBalancingConfig[0].least_request_experimental.choiceCount must be at least 2",
        ),
        (
            r#"{"loadBalancingConfig": [{"pick_first": {}}, {"grpclb": {}}]}"#,
            "loadBalancingConfig names no policy healthlb supports (pick_first, grpclb)",
        ),
        (
            r#"{"loadBalancingConfig": [{"round_robin": {}, "pick_first": {}}]}"#,
            "loadBalancingConfig[0] must hold exactly one policy",
        ),
        (
            r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {"interval": "10", "childPolicy": [{"round_robin": {}}]}}]}"#,
            "loadBalancingConfig[0].outlier_detection_experimental.interval must be a duration",
        ),
        (
            r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {"maxEjectionPercent": 101, "childPolicy": [{"round_robin": {}}]}}]}"#,
            "maxEjectionPercent must be a whole number from 0 to 100",
        ),
        (
            r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {}}]}"#,
            "outlier_detection_experimental.childPolicy is required",
        ),
        (
            r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 0, "childPolicy": [{"round_robin": {}}]}}]}"#,
            "loadBalancingConfig[0].random_subsetting.subsetSize must be at least 1",
        ),
        (
            r#"{"loadBalancingConfig": [{"random_subsetting": {"childPolicy": [{"round_robin": {}}]}}]}"#,
            "loadBalancingConfig[0].random_subsetting.subsetSize is required",
        ),
        (
            r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 2}}]}"#,
            "loadBalancingConfig[0].random_subsetting.childPolicy is required",
        ),
        (
            r#"{"methodConfig": [{"name": [{"service": "a"}], "retryPolicy": {"maxAttempts": 1, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
            "methodConfig[0].retryPolicy.maxAttempts must be at least 2",
        ),
        (
            r#"{"methodConfig": [{"retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["NOPE"]}}]}"#,
            "methodConfig[0].retryPolicy.retryableStatusCodes[0] \"NOPE\" is not a gRPC status code name",
        ),
        (
            r#"{"methodConfig": [{"name": [{"method": "Unary"}]}]}"#,
            "methodConfig[0].name[0] names a method without its service",
        ),
        (
            r#"{"methodConfig": [{"name": [{"service": "a"}]}, {"name": [{"service": "a"}]}]}"#,
            "methodConfig[1].name names a/ a second time",
        ),
        (
            r#"{"retryThrottling": {"maxTokens": 1001, "tokenRatio": 1}}"#,
            "retryThrottling.maxTokens must be a whole number from 1 to 1000",
        ),
        (
            r#"{"methodConfig": [{"timeout": 5}]}"#,
            "methodConfig[0].timeout must be a string, not a number",
        ),
    ];
    for (json, message) in cases {
        let err = ServiceConfig::parse(json).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig);
        assert!(err.to_string().contains(message), "{json}: {err}");
    }
}

#[test]
fn txt_choices_match_language_percentage_and_hostname() {
    let chooser = Chooser {
        percentile: 40,
        hostname: Some("pod-a".into()),
    };
    let record = |choices: &str| vec!["v=spf1".to_owned(), format!("grpc_config={choices}")];
    let timeout =
        |s: &str| format!(r#"{{"methodConfig": [{{"name": [{{}}], "timeout": "{s}"}}]}}"#);
    let chosen = |choices: String| {
        ServiceConfig::from_txt(&record(&choices), &chooser)
            .unwrap()
            .and_then(|c| c.method_config[0].timeout)
    };
    let one = timeout("1s");
    let two = timeout("2s");
    assert_eq!(
        chosen(format!(
            r#"[{{"clientLanguage": ["go"], "serviceConfig": {one}}}, {{"serviceConfig": {two}}}]"#
        )),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        chosen(format!(
            r#"[{{"clientLanguage": ["RUST"], "serviceConfig": {one}}}]"#
        )),
        Some(Duration::from_secs(1))
    );
    // Percentile 40 is in a 41 % choice, not in a 40 % one.
    assert_eq!(
        chosen(format!(
            r#"[{{"percentage": 40, "serviceConfig": {one}}}, {{"percentage": 41, "serviceConfig": {two}}}]"#
        )),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        chosen(format!(
            r#"[{{"clientHostname": ["pod-b"], "serviceConfig": {one}}}, {{"clientHostname": ["pod-a"], "serviceConfig": {two}}}]"#
        )),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        ServiceConfig::from_txt(&["v=spf1".to_owned()], &chooser).unwrap(),
        None
    );
}

#[test]
fn bad_txt_records_name_what_is_wrong() {
    let chooser = Chooser {
        percentile: 0,
        hostname: None,
    };
    for (records, message) in [
        (vec!["grpc_config=[", "x"], "is not JSON"),
        (vec!["grpc_config=[]", "grpc_config=[]"], "more than one"),
        (
            vec![r#"grpc_config={"serviceConfig": {}}"#],
            "must be a list",
        ),
        (
            vec![r#"grpc_config=[{"percentage": 101, "serviceConfig": {}}]"#],
            "0 to 100",
        ),
        (
            vec![r#"grpc_config=[{"clientLanguage": "rust", "serviceConfig": {}}]"#],
            "must be a list",
        ),
        (vec![r#"grpc_config=[{}]"#], "serviceConfig is required"),
        (
            vec![r#"grpc_config=[{"serviceConfig": {"methodConfig": 1}}]"#],
            "_grpc_config[0].serviceConfig",
        ),
    ] {
        let records: Vec<String> = records.into_iter().map(str::to_owned).collect();
        let err = ServiceConfig::from_txt(&records, &chooser).unwrap_err();
        assert!(err.to_string().contains(message), "{records:?}: {err}");
    }
}
