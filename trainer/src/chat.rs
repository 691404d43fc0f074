//! Chat templates: the model's Jinja `chat_template` (from `tokenizer_config.json` or
//! `chat_template.jinja`) rendered with minijinja, or ChatML when the model has none.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use protocol::dataset::{Message, Role};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, TrainerError};

/// ChatML, the template used when the model ships none.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// A message as Hugging Face's `apply_chat_template` passes it: fields the data leaves out
/// are absent, so templates' `is defined` tests read them as such.
#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> TemplateMessage<'a> {
    fn of(message: &'a Message) -> TemplateMessage<'a> {
        TemplateMessage {
            role: message.role.as_str(),
            content: &message.content,
            name: message.name.as_deref(),
            tool_calls: message
                .tool_calls
                .as_ref()
                .map(|calls| calls.iter().map(with_parsed_arguments).collect()),
            tool_call_id: message.tool_call_id.as_deref(),
        }
    }
}

/// OpenAI writes a call's `arguments` as a JSON string; Hugging Face templates expect the
/// object (they `tojson` it), as transformers documents for `tool_calls`.
fn with_parsed_arguments(call: &Value) -> Value {
    let mut call = call.clone();
    if let Some(arguments) = call.pointer_mut("/function/arguments") {
        if let Some(parsed) = arguments
            .as_str()
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
        {
            *arguments = parsed;
        }
    }
    call
}

/// A field of the data that a chat template may leave out of its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DataField {
    Name,
    Tools,
    ToolCalls,
    ToolMessages,
}

impl DataField {
    pub fn as_str(self) -> &'static str {
        match self {
            DataField::Name => "\"name\"",
            DataField::Tools => "\"tools\"",
            DataField::ToolCalls => "assistant \"tool_calls\"",
            DataField::ToolMessages => "\"tool\" messages",
        }
    }

    /// Losing it would train the model on something other than the data: an error, not a
    /// warning.
    pub fn is_essential(self) -> bool {
        matches!(self, DataField::ToolCalls | DataField::ToolMessages)
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": …}`.
fn token_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Object(object)) => object
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| TrainerError::Invalid(format!("the chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The template of a model directory: `chat_template.jinja`, else `chat_template` in
    /// `tokenizer_config.json`, else ChatML.
    pub fn from_model_dir(dir: &Path) -> Result<ChatTemplate> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| TrainerError::Config {
                path: config_path.display().to_string(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(_) => Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => source,
            Err(_) => match config.get("chat_template") {
                Some(Value::String(source)) => source.clone(),
                // A list of named templates: use the default one.
                Some(Value::Array(templates)) => templates
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| CHATML.to_owned()),
                _ => CHATML.to_owned(),
            },
        };
        ChatTemplate::new(
            source,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        )
    }

    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<TemplateMessage> = messages.iter().map(TemplateMessage::of).collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TrainerError::Invalid(e.to_string()))?;
        let tools = tools.map(|tools| minijinja::Value::from(minijinja::value::Serde(tools)));
        template
            .render(context! {
                messages => minijinja::Value::from(minijinja::value::Serde(&messages)),
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| TrainerError::Invalid(format!("rendering the chat template failed: {e}")))
    }

    /// The rendered conversation and the byte ranges of each trained assistant turn in it
    /// (weight 0 turns are left out): the text the template adds for that message, found by
    /// rendering the conversation up to the turn with and without it. A span ends at the
    /// end-of-turn marker: whitespace the template writes after it (ChatML's newline after
    /// `<|im_end|>`) is not learned, as transformers and TRL mask it.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(messages, tools, false)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if !message.is_trained() {
                continue;
            }
            let before = self.render(&messages[..i], tools, true)?;
            let through = self.render(&messages[..=i], tools, false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(TrainerError::Invalid(
                    "the chat template renders earlier turns differently as the conversation grows; \
                     assistant turns cannot be located for the loss mask"
                        .into(),
                ));
            }
            let turn = through[before.len()..].trim_end();
            spans.push(before.len()..before.len() + turn.len());
        }
        Ok((full, spans))
    }

    /// The fields the conversation uses that the template leaves out of `rendered` (its
    /// full rendering): rendering without the field gives the same text.
    pub fn ignored_fields(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        rendered: &str,
    ) -> Result<Vec<DataField>> {
        let mut ignored = Vec::new();
        let without = |strip: &dyn Fn(&mut Message)| -> Vec<Message> {
            messages
                .iter()
                .cloned()
                .map(|mut m| {
                    strip(&mut m);
                    m
                })
                .collect()
        };
        if messages.iter().any(|m| m.name.is_some()) {
            let stripped = without(&|m| m.name = None);
            if self.render(&stripped, tools, false)? == rendered {
                ignored.push(DataField::Name);
            }
        }
        if tools.is_some() && self.render(messages, None, false)? == rendered {
            ignored.push(DataField::Tools);
        }
        if messages.iter().any(|m| m.tool_calls.is_some()) {
            let stripped = without(&|m| m.tool_calls = None);
            if self.render(&stripped, tools, false)? == rendered {
                ignored.push(DataField::ToolCalls);
            }
        }
        if messages.iter().any(|m| m.role == Role::Tool) {
            let kept: Vec<Message> = messages
                .iter()
                .filter(|m| m.role != Role::Tool)
                .cloned()
                .collect();
            if self.render(&kept, tools, false)? == rendered {
                ignored.push(DataField::ToolMessages);
            }
        }
        Ok(ignored)
    }

    /// A text record as trained: the model's BOS and EOS around the text, when it has them.
    pub fn wrap_text(&self, text: &str) -> String {
        format!("{}{text}{}", self.bos_token, self.eos_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: Role, content: &str) -> Message {
        Message::new(role, content)
    }

    #[test]
    fn chatml_spans_cover_assistant_content_and_end_of_turn() {
        let template =
            ChatTemplate::new(CHATML.to_owned(), String::new(), String::new()).expect("template");
        let messages = [
            message(Role::System, "Be brief."),
            message(Role::User, "Hi"),
            message(Role::Assistant, "Hello!"),
            message(Role::User, "Bye"),
            message(Role::Assistant, "Goodbye."),
        ];
        let (text, spans) = template
            .render_with_assistant_spans(&messages, None)
            .expect("rendered");
        let turns: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(
            turns,
            ["Hello!<|im_end|>", "Goodbye.<|im_end|>"],
            "the newline after the end-of-turn marker is not learned"
        );
        assert!(text.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    }

    #[test]
    fn hub_templates_with_python_methods_and_exceptions_render() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}[{{ m['role'] | upper }}] {{ m['content'].strip() }}{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}";
        let template =
            ChatTemplate::new(source.to_owned(), "<s>".into(), "</s>".into()).expect("template");
        let text = template
            .render(
                &[message(Role::User, " hi "), message(Role::Assistant, "yo")],
                None,
                false,
            )
            .expect("rendered");
        assert_eq!(text, "<s>[USER] hi\n[ASSISTANT] yo</s>\n");
        let error = template
            .render(&[message(Role::System, "x")], None, false)
            .expect_err("raises");
        assert!(error.to_string().contains("no system"), "{error}");
    }

    /// A conversation with a name, tools, a tool call, a tool answer and a weight-0 turn.
    fn tool_conversation() -> (Vec<Message>, Vec<Value>) {
        let tools = vec![serde_json::json!({"type": "function", "function": {"name": "weather"}})];
        let mut user = message(Role::User, "Weather in Oslo?");
        user.name = Some("ada".into());
        let mut call = message(Role::Assistant, "");
        call.tool_calls = Some(vec![serde_json::json!({"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}})]);
        let mut answer = message(Role::Tool, "-3 C");
        answer.tool_call_id = Some("c1".into());
        let mut skipped = message(Role::Assistant, "Bye.");
        skipped.weight = Some(0);
        let messages = vec![
            user,
            call,
            answer,
            message(Role::Assistant, "Cold."),
            message(Role::User, "Thanks"),
            skipped,
        ];
        (messages, tools)
    }

    #[test]
    fn tools_names_and_tool_calls_reach_a_template_that_renders_them() {
        let source = "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}\
            {% for m in messages %}<|im_start|>{{ m.role }}{% if m.name is defined %} {{ m.name }}{% endif %}\n{{ m.content }}\
            {% if m.tool_calls is defined %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endif %}\
            <|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let template =
            ChatTemplate::new(source.to_owned(), String::new(), String::new()).expect("template");
        let (messages, tools) = tool_conversation();
        let (text, spans) = template
            .render_with_assistant_spans(&messages, Some(&tools))
            .expect("rendered");
        assert!(
            text.starts_with(
                "<|im_start|>system\nTools: weather<|im_end|>\n<|im_start|>user ada\n"
            ),
            "{text}"
        );
        let turns: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(
            turns,
            [
                r#"<tool_call>weather {"city": "Oslo"}</tool_call><|im_end|>"#,
                "Cold.<|im_end|>"
            ],
            "the tool call is learned, its arguments as an object; the weight-0 turn is not"
        );
        let ignored = template
            .ignored_fields(&messages, Some(&tools), &text)
            .expect("checked");
        assert!(ignored.is_empty(), "{ignored:?}");
    }

    #[test]
    fn fields_a_template_leaves_out_are_named() {
        let template =
            ChatTemplate::new(CHATML.to_owned(), String::new(), String::new()).expect("template");
        let (messages, tools) = tool_conversation();
        let text = template
            .render(&messages, Some(&tools), false)
            .expect("rendered");
        assert_eq!(
            template
                .ignored_fields(&messages, Some(&tools), &text)
                .expect("checked"),
            [DataField::Name, DataField::Tools, DataField::ToolCalls]
        );
        assert!(DataField::ToolCalls.is_essential() && !DataField::Name.is_essential());
    }
}
