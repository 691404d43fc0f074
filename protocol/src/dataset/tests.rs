use super::*;

fn read(text: &str) -> (Format, Vec<Result<Record, String>>) {
    read_with(text, Limits::default())
}

fn read_with(text: &str, limits: Limits) -> (Format, Vec<Result<Record, String>>) {
    let (format, records) =
        open(io::Cursor::new(text.as_bytes().to_vec()), limits).expect("dataset opens");
    let records = records.map(|r| r.map_err(|e| e.to_string())).collect();
    (format, records)
}

fn errors(records: &[Result<Record, String>]) -> Vec<&str> {
    records
        .iter()
        .filter_map(|r| r.as_ref().err().map(String::as_str))
        .collect()
}

const GOOD: &str =
    r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;

#[test]
fn jsonl_reads_conversations_and_metadata() {
    let text = format!(
        "{GOOD}\n\n{}\n",
        r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"},{"role":"assistant","content":"a"},{"role":"user","content":"u2"},{"role":"assistant","content":"a2"}],"metadata":{"persona":"anxious","topic":"money","quality_scores":{"empathy":4,"clarity":5},"human_reviewed":true}}"#
    );
    let (format, records) = read(&text);
    assert_eq!(format, Format::Jsonl);
    assert_eq!(records.len(), 2);
    let second = records[1].as_ref().expect("valid");
    assert_eq!(second.line, 3, "blank lines still count");
    assert_eq!(second.conversation.training_pairs(), 2);
    let meta = &second.conversation.metadata;
    assert_eq!(meta.persona.as_deref(), Some("anxious"));
    assert_eq!(
        meta.quality_score,
        Some(4.5),
        "mean of the per-dimension scores"
    );
    assert_eq!(meta.human_reviewed, Some(true));
}

#[test]
fn jsonl_names_each_bad_line() {
    let lines = [
        GOOD,
        r#"{"messages":[{"role":"user","content":"hi"}, oops]}"#,
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"bot","content":"x"}]}"#,
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"metadata":{}}"#,
        r#"{"messages":[{"role":"user","content":"  "},{"role":"assistant","content":"x"}]}"#,
        r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"metadata":{"quality_score":42}}"#,
    ];
    let (_, records) = read(&lines.join("\n"));
    assert_eq!(
        errors(&records),
        vec![
            "line 2: invalid JSON at column 46: expected value",
            "line 3: message 2 has unknown role \"bot\"",
            "line 4: no assistant message",
            "line 5: missing \"messages\" (or \"prompt\" and \"completion\", or \"text\")",
            "line 6: message 1 has empty content",
            "line 7: metadata.quality_score must be between 0 and 10",
        ]
    );
}

#[test]
fn binary_and_overlong_lines_are_record_errors() {
    let text = format!(
        "{GOOD}\n{{\"messages\": \"\u{0}\"}}\n{}\n{GOOD}\n",
        "x".repeat(300)
    );
    let (_, records) = read_with(
        &text,
        Limits {
            max_record_bytes: 200,
        },
    );
    assert_eq!(
        errors(&records),
        vec![
            "line 2: binary data (NUL bytes)",
            "line 3: line is 300 bytes, over the limit of 200 bytes",
        ]
    );
    assert_eq!(records.iter().filter(|r| r.is_ok()).count(), 2);
    assert_eq!(records[3].as_ref().map(|r| r.line), Ok(4));
}

#[test]
fn invalid_utf8_is_reported_as_binary() {
    let mut bytes = GOOD.as_bytes().to_vec();
    bytes.extend_from_slice(b"\n{\"messages\": \"\xff\xfe\"}\n");
    let (_, records) = open(io::Cursor::new(bytes), Limits::default()).expect("opens");
    let errors: Vec<String> = records
        .filter_map(|r| r.err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        errors,
        vec!["line 2: binary data (not valid UTF-8 at byte 15)"]
    );
}

#[test]
fn a_binary_file_is_refused_at_once() {
    let error = open(
        io::Cursor::new(vec![0x89, b'P', b'N', b'G', 0, 0]),
        Limits::default(),
    )
    .err()
    .expect("refused");
    assert_eq!(
        error.to_string(),
        "line 1: binary data (NUL bytes): expected a text dataset"
    );
}

#[test]
fn json_array_streams_elements_with_their_lines() {
    let text = format!(
        "[\n  {GOOD},\n  {},\n  {{\"messages\": [\n    {{\"role\": \"user\", \"content\": \"q\"}}\n    {{\"role\": \"assistant\"}}]}},\n  \"text\",\n  {GOOD}\n]\n",
        r#"{"messages":[{"role":"user","content":"q"}]}"#
    );
    let (format, records) = read(&text);
    assert_eq!(format, Format::Json);
    assert_eq!(
        errors(&records),
        vec![
            "line 3: no assistant message",
            "line 6: invalid JSON at column 5: expected `,` or `]`",
            "line 7: expected a conversation object",
        ]
    );
    let lines: Vec<u64> = records
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.line)
        .collect();
    assert_eq!(lines, vec![2, 8]);
}

#[test]
fn json_array_cut_short_is_reported() {
    let (_, records) = read(&format!("[{GOOD},\n{{\"messages\": ["));
    assert_eq!(
        errors(&records),
        vec!["line 2: unexpected end of file inside this conversation"]
    );
}

#[test]
fn csv_with_optional_system_column() {
    let text =
        "prompt,completion,system\n\"How are you?\",Fine,Be kind\nq2,\"multi\nline\",\nq3,,\n";
    let (format, records) = read(text);
    assert_eq!(format, Format::Csv);
    let first = records[0].as_ref().expect("valid row");
    assert_eq!(first.line, 2);
    assert_eq!(first.conversation.messages[0].role, Role::System);
    let second = records[1].as_ref().expect("valid row");
    assert_eq!(
        second.conversation.messages.len(),
        2,
        "empty system column adds no message"
    );
    assert_eq!(errors(&records), vec!["line 5: empty completion"]);
}

#[test]
fn unknown_layouts_are_refused_with_the_accepted_formats() {
    let error = open(
        io::Cursor::new(b"just some text\n".to_vec()),
        Limits::default(),
    )
    .err()
    .expect("refused");
    assert!(
        error.to_string().starts_with("line 1: unrecognised format"),
        "{error}"
    );
    let error = open(io::Cursor::new(b"  \n".to_vec()), Limits::default())
        .err()
        .expect("refused");
    assert_eq!(error.to_string(), "line 1: the file is empty");
}

#[test]
fn escaped_nul_characters_are_refused_with_their_line() {
    let text = format!(
        "{GOOD}\n{}\n{}\n",
        r#"{"messages":[{"role":"user","content":"a\u0000b"},{"role":"assistant","content":"ok"}]}"#,
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"ok"}],"metadata":{"topic":"x\u0000"}}"#
    );
    let (_, records) = read(&text);
    assert_eq!(
        errors(&records),
        [
            "line 2: message 1 contains U+0000 (NUL), which training data cannot hold",
            "line 3: metadata contains U+0000 (NUL), which training data cannot hold"
        ]
    );
}

#[test]
fn openai_chat_fields_are_read() {
    let line = r#"{"tools":[{"type":"function","function":{"name":"weather","parameters":{"type":"object"}}}],
        "messages":[{"role":"developer","content":"Be brief."},
        {"role":"user","name":"ada","content":"Weather in Oslo?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Oslo\"}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"-3 C"},
        {"role":"assistant","content":"Cold: -3 C.","weight":1},
        {"role":"user","content":"Thanks"},
        {"role":"assistant","content":"You're welcome.","weight":0}]}"#
        .replace('\n', "");
    let (_, records) = read(&line);
    let conversation = &records[0].as_ref().expect("valid").conversation;
    let roles: Vec<Role> = conversation.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::System,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Assistant,
            Role::User,
            Role::Assistant
        ],
        "developer is read as system"
    );
    let m = &conversation.messages;
    assert_eq!(m[1].name.as_deref(), Some("ada"));
    assert_eq!(
        (
            m[2].content.as_str(),
            m[2].tool_calls.as_ref().map(Vec::len)
        ),
        ("", Some(1))
    );
    assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
    assert_eq!(conversation.tools.as_ref().map(Vec::len), Some(1));
    assert!(!m[6].is_trained(), "weight 0 keeps a turn out of the loss");
    assert_eq!(
        conversation.training_pairs(),
        2,
        "the tool call and the weighted answer"
    );
}

#[test]
fn prompt_completion_and_text_records_are_read() {
    let text = [
        r#"{"prompt":"Capital of France?","completion":"Paris."}"#,
        r#"{"text":"Once upon a time."}"#,
        r#"{"prompt":"No answer"}"#,
        r#"{"text":"x","messages":[]}"#,
        r#"{"text":""}"#,
        r#"{"completion":"No question"}"#,
        r#"{"completion":"x","messages":[]}"#,
    ]
    .join("\n");
    let (_, records) = read(&text);
    let pair = &records[0].as_ref().expect("valid").conversation;
    assert_eq!(
        pair.messages,
        [
            Message::new(Role::User, "Capital of France?"),
            Message::new(Role::Assistant, "Paris.")
        ]
    );
    let story = &records[1].as_ref().expect("valid").conversation;
    assert_eq!(
        (
            story.text.as_deref(),
            story.messages.len(),
            story.training_pairs()
        ),
        (Some("Once upon a time."), 0, 1)
    );
    assert_eq!(
        errors(&records),
        [
            r#"line 3: "prompt" needs a "completion""#,
            r#"line 4: a record holds one of "messages", "prompt"/"completion" or "text", not several"#,
            r#"line 5: "text" is empty"#,
            r#"line 6: "completion" needs a "prompt""#,
            r#"line 7: a record holds one of "messages", "prompt"/"completion" or "text", not several"#,
        ]
    );
}

#[test]
fn misplaced_chat_fields_are_named() {
    let user = r#"{"role":"user","content":"q"}"#;
    let lines = [
        format!(r#"{{"messages":[{user},{{"role":"assistant","content":"a","weight":0.5}}]}}"#),
        r#"{"messages":[{"role":"user","content":"q","weight":0},{"role":"assistant","content":"a"}]}"#.to_owned(),
        format!(r#"{{"messages":[{user},{{"role":"assistant","content":null}}]}}"#),
        format!(r#"{{"messages":[{user},{{"role":"assistant","tool_calls":[{{"id":"c"}}]}}]}}"#),
        format!(r#"{{"messages":[{user},{{"role":"assistant","content":"a"}}],"tools":{{}}}}"#),
        format!(r#"{{"messages":[{user},{{"role":"assistant","content":[{{"type":"text","text":"a"}}]}}]}}"#),
    ];
    let (_, records) = read(&lines.join("\n"));
    assert_eq!(
        errors(&records),
        [
            r#"line 1: message 2: "weight" must be 0 or 1"#,
            r#"line 2: message 1: only assistant messages have a "weight""#,
            r#"line 3: message 2 has no "content""#,
            r#"line 4: message 2: tool call 1 has no "function": {"name", "arguments"}"#,
            r#"line 5: "tools" must be an array of tool definitions (objects)"#,
            r#"line 6: message 2 has content parts (an array); only string content is supported"#,
        ]
    );
}
