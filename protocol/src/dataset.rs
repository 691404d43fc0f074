//! The chat dataset formats every part of the platform accepts, read as a stream.
//!
//! Accepted inputs, detected from the content:
//! - JSONL, one record per line, each of:
//!   - chat: `{"messages": [{"role", "content", "name"?, "weight"?, "tool_calls"?,
//!     "tool_call_id"?}...], "tools"?: [...], "metadata"?: {...}}` (OpenAI's fine-tuning
//!     format; roles `system`, `developer` (read as `system`), `user`, `assistant`, `tool`);
//!   - prompt/completion: `{"prompt": "...", "completion": "..."}`, read as a user and an
//!     assistant turn;
//!   - text: `{"text": "..."}` (Together's format), trained on every token;
//! - a JSON array of such objects (streamed element by element, never loaded whole);
//! - CSV with a header naming `prompt`, `completion` and optionally `system`.
//!
//! Records are yielded one at a time, so memory stays flat in the file size. A bad record
//! yields a [`RecordError`] naming its line and the problem; reading goes on with the next one.

use std::fmt;
use std::io::{self, BufRead, Read};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Default cap on one record (a JSONL line, an array element or a CSV row).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's answer to an assistant's tool call.
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    /// Empty for an assistant turn that only calls tools.
    pub content: String,
    /// The speaker's name, for templates that render it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// OpenAI's per-turn weight on assistant messages: 0 keeps the turn out of the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// An assistant's tool calls as the data gives them (OpenAI's shape:
    /// `{"id", "type": "function", "function": {"name", "arguments"}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            name: None,
            weight: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// An assistant turn the loss counts: not weighted 0.
    pub fn is_trained(&self) -> bool {
        self.role == Role::Assistant && self.weight != Some(0)
    }
}

/// Per-dimension quality scores a data pipeline may attach to a conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityScores {
    pub empathy: Option<f64>,
    pub clarity: Option<f64>,
    pub appropriateness: Option<f64>,
}

impl QualityScores {
    fn mean(&self) -> Option<f64> {
        let present: Vec<f64> = [self.empathy, self.clarity, self.appropriateness]
            .into_iter()
            .flatten()
            .collect();
        (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
    }
}

/// The metadata fields the platform understands; anything else is kept verbatim in `raw`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConversationMetadata {
    pub persona: Option<String>,
    pub emotional_arc: Option<String>,
    pub topic: Option<String>,
    /// Overall score; when absent, the mean of `quality_scores`.
    pub quality_score: Option<f64>,
    pub quality_scores: QualityScores,
    pub human_reviewed: Option<bool>,
    pub raw: Option<Value>,
}

/// One training record: a chat (`messages`, with the `tools` it may call), or plain
/// `text`, whose every token is trained on (then `messages` is empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub tools: Option<Vec<Value>>,
    pub text: Option<String>,
    pub metadata: ConversationMetadata,
}

impl Conversation {
    pub fn chat(messages: Vec<Message>) -> Conversation {
        Conversation {
            messages,
            tools: None,
            text: None,
            metadata: ConversationMetadata::default(),
        }
    }

    /// Training targets: the assistant turns the loss counts, or 1 for a text record.
    pub fn training_pairs(&self) -> usize {
        if self.text.is_some() {
            return 1;
        }
        self.messages.iter().filter(|m| m.is_trained()).count()
    }
}

/// One conversation and the line it starts on (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub line: u64,
    pub conversation: Conversation,
}

/// A record that could not be read; reading continues after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub line: u64,
    pub message: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{0}")]
    Record(RecordError),
    /// The input itself failed (disk, connection); reading cannot go on.
    #[error("reading the dataset failed: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Json,
    Csv,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Json => "json",
            Format::Csv => "csv",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_record_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

/// The records of a dataset, in file order.
pub type Records = Box<dyn Iterator<Item = Result<Record, DatasetError>>>;

/// Opens a dataset: detects its format from the first bytes and returns a record iterator.
///
/// Fails only when the input cannot be a dataset at all (binary, empty, unknown layout);
/// per-record problems come out of the iterator.
pub fn open<R: Read + 'static>(
    input: R,
    limits: Limits,
) -> Result<(Format, Records), DatasetError> {
    let mut input = io::BufReader::with_capacity(64 * 1024, input);
    let head = input.fill_buf()?;
    let head = head
        .strip_prefix(b"\xEF\xBB\xBF".as_slice())
        .unwrap_or(head);
    // A NUL on the first line means a binary file, not a text dataset with one bad record.
    let first_line = head.split(|&b| b == b'\n').next().unwrap_or(head);
    if first_line.contains(&0) {
        return Err(record_error(
            1,
            "binary data (NUL bytes): expected a text dataset",
        ));
    }
    let Some(&first) = head.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(record_error(1, "the file is empty"));
    };
    Ok(match first {
        b'[' => (Format::Json, Box::new(JsonArrayReader::new(input, limits))),
        b'{' => (Format::Jsonl, Box::new(JsonlReader::new(input, limits))),
        _ => (Format::Csv, Box::new(CsvReader::new(input, limits)?)),
    })
}

fn record_error(line: u64, message: impl Into<String>) -> DatasetError {
    DatasetError::Record(RecordError {
        line,
        message: message.into(),
    })
}

/// Turns one parsed JSON value into a conversation, naming the first problem found.
pub fn conversation_from_value(value: Value) -> Result<Conversation, String> {
    let Value::Object(mut object) = value else {
        return Err("expected a JSON object with \"messages\"".into());
    };
    let metadata = match object.remove("metadata") {
        None | Some(Value::Null) => ConversationMetadata::default(),
        Some(raw @ Value::Object(_)) => metadata_from_value(raw)?,
        Some(_) => return Err("\"metadata\" must be an object".into()),
    };
    let layouts = [
        object.contains_key("messages"),
        object.contains_key("text"),
        object.contains_key("prompt") || object.contains_key("completion"),
    ];
    if layouts.iter().filter(|present| **present).count() > 1 {
        return Err(
            "a record holds one of \"messages\", \"prompt\"/\"completion\" or \"text\", not several"
                .into(),
        );
    }
    if let Some(text) = object.remove("text") {
        let Value::String(text) = text else {
            return Err("\"text\" must be a string".into());
        };
        return Ok(Conversation {
            text: Some(checked_text(text, "\"text\"")?),
            messages: Vec::new(),
            tools: None,
            metadata,
        });
    }
    if layouts[2] {
        let field = |name: &str, other: &str| match object.get(name) {
            Some(Value::String(text)) => checked_text(text.clone(), &format!("\"{name}\"")),
            Some(_) => Err(format!("\"{name}\" must be a string")),
            None => Err(format!("\"{other}\" needs a \"{name}\"")),
        };
        let messages = vec![
            Message::new(Role::User, field("prompt", "completion")?),
            Message::new(Role::Assistant, field("completion", "prompt")?),
        ];
        return Ok(Conversation {
            metadata,
            ..Conversation::chat(messages)
        });
    }
    let messages = match object.remove("messages") {
        None => {
            return Err(
                "missing \"messages\" (or \"prompt\" and \"completion\", or \"text\")".into(),
            )
        }
        Some(Value::Array(messages)) => messages,
        Some(_) => return Err("\"messages\" must be an array".into()),
    };
    if messages.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| message_from_value(index + 1, message))
        .collect::<Result<Vec<_>, _>>()?;
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant message".into());
    }
    let tools = match object.remove("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) if tools.iter().all(Value::is_object) => {
            if tools.iter().any(holds_nul) {
                return Err(
                    "\"tools\" contains U+0000 (NUL), which training data cannot hold".into(),
                );
            }
            Some(tools)
        }
        Some(_) => return Err("\"tools\" must be an array of tool definitions (objects)".into()),
    };
    Ok(Conversation {
        messages,
        tools,
        text: None,
        metadata,
    })
}

/// `text` if it is not blank and holds no U+0000.
fn checked_text(text: String, what: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    if text.contains('\0') {
        return Err(format!(
            "{what} contains U+0000 (NUL), which training data cannot hold"
        ));
    }
    Ok(text)
}

fn message_from_value(number: usize, value: Value) -> Result<Message, String> {
    let Value::Object(mut object) = value else {
        return Err(format!("message {number} is not an object"));
    };
    let role = match object.remove("role") {
        Some(Value::String(role)) => match role.as_str() {
            // OpenAI's newer name for the system turn.
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return Err(format!("message {number} has unknown role {role:?}")),
        },
        Some(_) => return Err(format!("message {number} has a non-string \"role\"")),
        None => return Err(format!("message {number} has no \"role\"")),
    };
    let optional_text =
        |object: &mut serde_json::Map<String, Value>, key: &str| match object.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => {
                checked_text(text, &format!("message {number}'s \"{key}\"")).map(Some)
            }
            Some(_) => Err(format!("message {number} has a non-string \"{key}\"")),
        };
    let name = optional_text(&mut object, "name")?;
    let tool_call_id = optional_text(&mut object, "tool_call_id")?;
    let tool_calls = match object.remove("tool_calls") {
        None | Some(Value::Null) => None,
        Some(_) if role != Role::Assistant => {
            return Err(format!(
                "message {number}: only assistant messages have \"tool_calls\""
            ))
        }
        Some(Value::Array(calls)) if !calls.is_empty() => {
            for (index, call) in calls.iter().enumerate() {
                let named = call
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .is_some_and(Value::is_string);
                if !named {
                    return Err(format!(
                        "message {number}: tool call {} has no \"function\": {{\"name\", \"arguments\"}}",
                        index + 1
                    ));
                }
                if holds_nul(call) {
                    return Err(format!(
                        "message {number}: tool call {} contains U+0000 (NUL), which training data cannot hold",
                        index + 1
                    ));
                }
            }
            Some(calls)
        }
        Some(_) => {
            return Err(format!(
                "message {number}: \"tool_calls\" must be a non-empty array"
            ))
        }
    };
    let weight = match object.remove("weight") {
        None | Some(Value::Null) => None,
        Some(_) if role != Role::Assistant => {
            return Err(format!(
                "message {number}: only assistant messages have a \"weight\""
            ))
        }
        Some(value) => match value.as_f64() {
            Some(0.0) => Some(0),
            Some(1.0) => Some(1),
            _ => return Err(format!("message {number}: \"weight\" must be 0 or 1")),
        },
    };
    let content = match object.remove("content") {
        Some(Value::String(content)) => content,
        None | Some(Value::Null) if tool_calls.is_some() => String::new(),
        Some(Value::Array(_)) => {
            return Err(format!(
                "message {number} has content parts (an array); only string content is supported"
            ))
        }
        None | Some(Value::Null) => return Err(format!("message {number} has no \"content\"")),
        Some(_) => return Err(format!("message {number} has a non-string \"content\"")),
    };
    // A turn that only calls tools may say nothing.
    if content.trim().is_empty() && tool_calls.is_none() {
        return Err(format!("message {number} has empty content"));
    }
    if content.contains('\0') {
        return Err(format!(
            "message {number} contains U+0000 (NUL), which training data cannot hold"
        ));
    }
    Ok(Message {
        role,
        content,
        name,
        weight,
        tool_calls,
        tool_call_id,
    })
}

/// Whether any string (or key) inside `value` holds U+0000, which PostgreSQL's text and
/// JSON types refuse: such a record is refused alike on every backend.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(object) => object
            .iter()
            .any(|(key, item)| key.contains('\0') || holds_nul(item)),
        _ => false,
    }
}

fn metadata_from_value(raw: Value) -> Result<ConversationMetadata, String> {
    if holds_nul(&raw) {
        return Err("metadata contains U+0000 (NUL), which training data cannot hold".into());
    }
    let text = |key: &str| -> Result<Option<String>, String> {
        match raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("metadata.{key} must be a string")),
        }
    };
    let score = |value: Option<&Value>, name: &str| -> Result<Option<f64>, String> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if (0.0..=10.0).contains(&x) => Ok(Some(x)),
                _ => Err(format!("{name} must be between 0 and 10")),
            },
            Some(_) => Err(format!("{name} must be a number")),
        }
    };
    let quality_scores = match raw.get("quality_scores") {
        None | Some(Value::Null) => QualityScores::default(),
        Some(scores @ Value::Object(_)) => QualityScores {
            empathy: score(scores.get("empathy"), "metadata.quality_scores.empathy")?,
            clarity: score(scores.get("clarity"), "metadata.quality_scores.clarity")?,
            appropriateness: score(
                scores.get("appropriateness"),
                "metadata.quality_scores.appropriateness",
            )?,
        },
        Some(_) => return Err("metadata.quality_scores must be an object".into()),
    };
    let quality_score =
        score(raw.get("quality_score"), "metadata.quality_score")?.or(quality_scores.mean());
    let human_reviewed = match raw.get("human_reviewed") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err("metadata.human_reviewed must be true or false".into()),
    };
    Ok(ConversationMetadata {
        persona: text("persona")?,
        emotional_arc: text("emotional_arc")?,
        topic: text("topic")?,
        quality_score,
        quality_scores,
        human_reviewed,
        raw: Some(raw),
    })
}

fn utf8_text(bytes: &[u8]) -> Result<&str, String> {
    if bytes.contains(&0) {
        return Err("binary data (NUL bytes)".into());
    }
    std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "binary data (not valid UTF-8 at byte {})",
            e.valid_up_to() + 1
        )
    })
}

fn json_error_message(error: &serde_json::Error, column_offset: usize) -> String {
    let column = if error.line() <= 1 {
        error.column() + column_offset
    } else {
        error.column()
    };
    // serde_json's Display appends " at line L column C"; we report our own position.
    let text = error.to_string();
    let reason = text.split(" at line ").next().unwrap_or(&text);
    format!("invalid JSON at column {column}: {reason}")
}

/// Reads a line of at most `max` bytes (newline excluded). Returns `None` at end of input,
/// `Some(Err(len))` when the line was longer than `max` (the rest of it is skipped).
fn read_bounded_line<R: BufRead>(
    input: &mut R,
    buffer: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<Result<(), usize>>> {
    buffer.clear();
    let read = input
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', buffer)?;
    if read == 0 {
        return Ok(None);
    }
    if buffer.last() == Some(&b'\n') {
        buffer.pop();
        if buffer.last() == Some(&b'\r') {
            buffer.pop();
        }
        return Ok(Some(Ok(())));
    }
    if buffer.len() <= max {
        return Ok(Some(Ok(()))); // last line without a newline
    }
    let mut skipped = buffer.len();
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            break;
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(end) => {
                skipped += end;
                input.consume(end + 1);
                break;
            }
            None => {
                let n = available.len();
                skipped += n;
                input.consume(n);
            }
        }
    }
    Ok(Some(Err(skipped)))
}

struct JsonlReader<R> {
    input: R,
    limits: Limits,
    line: u64,
    buffer: Vec<u8>,
}

impl<R: BufRead> JsonlReader<R> {
    fn new(input: R, limits: Limits) -> Self {
        JsonlReader {
            input,
            limits,
            line: 0,
            buffer: Vec::new(),
        }
    }

    fn parse_line(&self) -> Result<Conversation, String> {
        let bytes = self
            .buffer
            .strip_prefix(b"\xEF\xBB\xBF".as_slice())
            .unwrap_or(&self.buffer);
        let text = utf8_text(bytes)?;
        let value: Value = serde_json::from_str(text).map_err(|e| json_error_message(&e, 0))?;
        conversation_from_value(value)
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<Record, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.line += 1;
            let outcome = match read_bounded_line(
                &mut self.input,
                &mut self.buffer,
                self.limits.max_record_bytes,
            ) {
                Err(e) => return Some(Err(e.into())),
                Ok(None) => return None,
                Ok(Some(outcome)) => outcome,
            };
            if let Err(length) = outcome {
                return Some(Err(record_error(
                    self.line,
                    format!(
                        "line is {length} bytes, over the limit of {} bytes",
                        self.limits.max_record_bytes
                    ),
                )));
            }
            if self.buffer.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(match self.parse_line() {
                Ok(conversation) => Ok(Record {
                    line: self.line,
                    conversation,
                }),
                Err(message) => Err(record_error(self.line, message)),
            });
        }
    }
}

/// Splits a top-level JSON array into its elements without parsing the whole document.
struct JsonArrayReader<R> {
    input: R,
    limits: Limits,
    line: u64,
    column: usize,
    started: bool,
    finished: bool,
    element: Vec<u8>,
}

impl<R: BufRead> JsonArrayReader<R> {
    fn new(input: R, limits: Limits) -> Self {
        JsonArrayReader {
            input,
            limits,
            line: 1,
            column: 0,
            started: false,
            finished: false,
            element: Vec::new(),
        }
    }

    fn next_byte(&mut self) -> io::Result<Option<u8>> {
        let available = self.input.fill_buf()?;
        let Some(&byte) = available.first() else {
            return Ok(None);
        };
        self.input.consume(1);
        if byte == b'\n' {
            self.line += 1;
            self.column = 0;
        } else {
            self.column += 1;
        }
        Ok(Some(byte))
    }

    fn next_significant(&mut self) -> io::Result<Option<u8>> {
        while let Some(byte) = self.next_byte()? {
            if !byte.is_ascii_whitespace() && byte != 0xEF && byte != 0xBB && byte != 0xBF {
                return Ok(Some(byte));
            }
        }
        Ok(None)
    }

    /// Reads one element whose first byte is `first`; returns whether it fit the limit.
    fn read_element(&mut self, first: u8) -> io::Result<Result<bool, ()>> {
        self.element.clear();
        self.element.push(first);
        let (mut depth, mut in_string, mut escaped) = (0i64, false, false);
        let mut byte = first;
        let mut within_limit = true;
        loop {
            if in_string {
                if escaped {
                    escaped = false;
                } else if byte == b'\\' {
                    escaped = true;
                } else if byte == b'"' {
                    in_string = false;
                }
            } else {
                match byte {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => depth -= 1,
                    _ => {}
                }
            }
            if depth == 0 && !in_string {
                return Ok(Ok(within_limit));
            }
            byte = match self.next_byte()? {
                Some(byte) => byte,
                None => return Ok(Err(())),
            };
            if within_limit {
                if self.element.len() >= self.limits.max_record_bytes {
                    within_limit = false;
                    self.element.clear();
                } else {
                    self.element.push(byte);
                }
            }
        }
    }
}

impl<R: BufRead> Iterator for JsonArrayReader<R> {
    type Item = Result<Record, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let result = (|| -> Result<Option<Record>, DatasetError> {
            if !self.started {
                self.started = true;
                if self.next_significant()? != Some(b'[') {
                    return Err(record_error(self.line, "expected a JSON array"));
                }
            }
            let mut first = self.next_significant()?;
            if first == Some(b',') {
                first = self.next_significant()?;
            }
            let Some(first) = first else {
                self.finished = true;
                return Err(record_error(
                    self.line,
                    "unexpected end of file: the JSON array is not closed",
                ));
            };
            if first == b']' {
                self.finished = true;
                return Ok(None);
            }
            let (line, column) = (self.line, self.column);
            if first != b'{' {
                // Strings and arrays can be skipped whole; after a bare scalar we cannot
                // tell where the next element starts, so reading stops there.
                let skippable = matches!(first, b'"' | b'[') && self.read_element(first)?.is_ok();
                self.finished = !skippable;
                return Err(record_error(line, "expected a conversation object"));
            }
            match self.read_element(first)? {
                Err(()) => {
                    self.finished = true;
                    Err(record_error(
                        line,
                        "unexpected end of file inside this conversation",
                    ))
                }
                Ok(false) => Err(record_error(
                    line,
                    format!(
                        "record is over the limit of {} bytes",
                        self.limits.max_record_bytes
                    ),
                )),
                Ok(true) => {
                    let text = utf8_text(&self.element).map_err(|m| record_error(line, m))?;
                    let value: Value = serde_json::from_str(text).map_err(|e| {
                        // Report where the error is in the file, not within the element.
                        let error_line = line + e.line().saturating_sub(1) as u64;
                        record_error(error_line, json_error_message(&e, column - 1))
                    })?;
                    conversation_from_value(value)
                        .map(|conversation| Some(Record { line, conversation }))
                        .map_err(|message| record_error(line, message))
                }
            }
        })();
        match result {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => None,
            Err(error) => {
                if matches!(error, DatasetError::Io(_)) {
                    self.finished = true;
                }
                Some(Err(error))
            }
        }
    }
}

struct CsvReader<R> {
    reader: csv::Reader<R>,
    limits: Limits,
    prompt: usize,
    completion: usize,
    system: Option<usize>,
    record: csv::ByteRecord,
    done: bool,
}

impl<R: Read> CsvReader<R> {
    fn new(input: R, limits: Limits) -> Result<Self, DatasetError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(input);
        let headers = reader
            .byte_headers()
            .map_err(|e| record_error(1, format!("unreadable CSV header: {e}")))?
            .clone();
        let position = |name: &str| {
            headers
                .iter()
                .position(|h| h.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
        };
        let unrecognised = || {
            record_error(
                1,
                "unrecognised format: expected chat JSONL ({\"messages\": [...]} per line), \
                 a JSON array of conversations, or CSV with the header prompt,completion[,system]",
            )
        };
        let prompt = position("prompt").ok_or_else(unrecognised)?;
        let completion = position("completion").ok_or_else(unrecognised)?;
        Ok(CsvReader {
            reader,
            limits,
            prompt,
            completion,
            system: position("system"),
            record: csv::ByteRecord::new(),
            done: false,
        })
    }

    fn conversation(&self) -> Result<Conversation, String> {
        if self.record.as_slice().len() > self.limits.max_record_bytes {
            return Err(format!(
                "row is over the limit of {} bytes",
                self.limits.max_record_bytes
            ));
        }
        let field = |index: usize, name: &str| -> Result<String, String> {
            let bytes = self
                .record
                .get(index)
                .ok_or_else(|| format!("missing the {name} column"))?;
            let text = utf8_text(bytes).map_err(|e| format!("{name}: {e}"))?;
            if text.trim().is_empty() {
                return Err(format!("empty {name}"));
            }
            Ok(text.to_owned())
        };
        let mut messages = Vec::with_capacity(3);
        if let Some(index) = self.system {
            let text = self.record.get(index).unwrap_or_default();
            if !text.trim_ascii().is_empty() {
                messages.push(Message::new(Role::System, field(index, "system")?));
            }
        }
        messages.push(Message::new(Role::User, field(self.prompt, "prompt")?));
        messages.push(Message::new(
            Role::Assistant,
            field(self.completion, "completion")?,
        ));
        Ok(Conversation::chat(messages))
    }
}

impl<R: Read> Iterator for CsvReader<R> {
    type Item = Result<Record, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.reader.read_byte_record(&mut self.record) {
            Ok(false) => {
                self.done = true;
                None
            }
            Ok(true) => {
                let line = self.record.position().map_or(0, |p| p.line());
                Some(match self.conversation() {
                    Ok(conversation) => Ok(Record { line, conversation }),
                    Err(message) => Err(record_error(line, message)),
                })
            }
            Err(error) => {
                let line = error.position().map_or(0, |p| p.line());
                match error.into_kind() {
                    csv::ErrorKind::Io(io) => {
                        self.done = true;
                        Some(Err(io.into()))
                    }
                    kind => Some(Err(record_error(line, format!("invalid CSV: {kind:?}")))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
