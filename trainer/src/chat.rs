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

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
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

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<TemplateMessage> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: role_name(m.role),
                content: &m.content,
            })
            .collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TrainerError::Invalid(e.to_string()))?;
        template
            .render(context! {
                messages => minijinja::Value::from(minijinja::value::Serde(&messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| TrainerError::Invalid(format!("rendering the chat template failed: {e}")))
    }

    /// The rendered conversation and the byte ranges of each assistant turn in it: the
    /// text the template adds for that message (content and end-of-turn marker), found by
    /// rendering the conversation up to the turn with and without it.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != Role::Assistant {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(TrainerError::Invalid(
                    "the chat template renders earlier turns differently as the conversation grows; \
                     assistant turns cannot be located for the loss mask"
                        .into(),
                ));
            }
            spans.push(before.len()..through.len());
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.to_owned(),
        }
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
            .render_with_assistant_spans(&messages)
            .expect("rendered");
        let turns: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(turns, ["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]);
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
                false,
            )
            .expect("rendered");
        assert_eq!(text, "<s>[USER] hi\n[ASSISTANT] yo</s>\n");
        let error = template
            .render(&[message(Role::System, "x")], false)
            .expect_err("raises");
        assert!(error.to_string().contains("no system"), "{error}");
    }
}
