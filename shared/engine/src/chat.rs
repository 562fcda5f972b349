//! Chat templates: the Jinja template shipped with a model, rendered as transformers renders it
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`, `strftime_now`).

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Templates come from model files, i.e. from strangers: rendering is bounded. minijinja charges
/// one fuel per instruction and per 64 bytes of every value it creates (concatenations, repeats,
/// filter and method results, output), checking known sizes before allocating, so this fuel
/// also caps the bytes a template can build up in intermediate values at 64 MB. Real chat
/// templates use a few thousand.
const FUEL: u64 = 1_000_000;
const MAX_OUTPUT_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    #[cfg(target_os = "linux")]
    renderer: crate::sandbox::Worker,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax =
            minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned("chat", source.to_string()).map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            #[cfg(target_os = "linux")]
            renderer: crate::sandbox::Worker::new(RENDERER),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_all(&[(messages, add_generation_prompt)])?.pop().expect("one conversation in, one out")
    }

    /// Renders each conversation (messages, `add_generation_prompt`), on Linux in the template's
    /// child process, whose memory and silence are bounded ([`RENDERER`]): minijinja
    /// materializes some values before charging fuel for them, so only a process of their own
    /// bounds what a hostile template can allocate. The outer error is the renderer's (out of
    /// memory, silent); the inner ones are each conversation's own (`raise_exception`, out of
    /// fuel, ...).
    pub fn render_all(&self, conversations: &[(&[ChatMessage], bool)]) -> Result<Vec<Result<String>>> {
        #[cfg(target_os = "linux")]
        {
            let mut rendered = Vec::with_capacity(conversations.len());
            // In groups, so that a data file's thousands of conversations are many requests,
            // each well within the renderer's time and memory.
            for group in conversations.chunks(RENDER_GROUP) {
                let request = serde_json::to_vec(group).map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
                let frames = self
                    .renderer
                    .call(&request, |request, out| {
                        let group: Vec<(Vec<ChatMessage>, bool)> = serde_json::from_slice(request).map_err(std::io::Error::other)?;
                        for (messages, add_generation_prompt) in &group {
                            write_frame(out, self.render_in_this_process(messages, *add_generation_prompt))?;
                        }
                        Ok(())
                    })
                    .map_err(|e| match e {
                        // Not the template's fault but this machine's (out of processes, say).
                        crate::sandbox::SandboxError::Start(source) => EngineError::io("chat template renderer", source),
                        other => EngineError::ChatTemplate(format!("the renderer {other}")),
                    })?;
                rendered.extend(read_frames(&frames, group.len())?);
            }
            Ok(rendered)
        }
        #[cfg(not(target_os = "linux"))]
        Ok(conversations.iter().map(|&(messages, add)| self.render_in_this_process(messages, add)).collect())
    }

    /// Renders in this process, bounded by fuel and output size only: what the fuzzer drives
    /// (it sees coverage in its own process only). Serving code calls [`Self::render`].
    pub fn render_in_this_process(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        // Written through a bounded buffer, so a template that prints without end stops at the
        // limit instead of when memory runs out.
        let mut out = BoundedOutput(Vec::new());
        let rendered = template.render_captured_to(
            minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.0).map_err(|e| EngineError::ChatTemplate(e.to_string())),
            Err(e) if e.kind() == ErrorKind::WriteFailure => Err(EngineError::ChatTemplate(format!("the rendered prompt exceeds {MAX_OUTPUT_BYTES} bytes"))),
            Err(e) => Err(EngineError::ChatTemplate(e.to_string())),
        }
    }
}

/// Bounds of the renderer process: four times what fuel lets a template build up, and far more
/// than a group of [`RENDER_GROUP`] conversations takes to render (a few milliseconds each).
#[cfg(target_os = "linux")]
const RENDERER: crate::sandbox::Limits = crate::sandbox::Limits { memory: 256 << 20, silence: std::time::Duration::from_secs(5) };

/// Conversations rendered in one request to the renderer.
#[cfg(target_os = "linux")]
const RENDER_GROUP: usize = 64;

/// One rendering as the renderer sends it: a tag (0 text, 1 error message), a little-endian
/// u32 length and the UTF-8 bytes.
#[cfg(target_os = "linux")]
fn write_frame(out: &mut dyn std::io::Write, rendered: Result<String>) -> std::io::Result<()> {
    let (tag, text) = match rendered {
        Ok(text) => (0u8, text),
        Err(EngineError::ChatTemplate(message)) => (1, message),
        Err(other) => (1, other.to_string()),
    };
    out.write_all(&[tag])?;
    out.write_all(&(text.len() as u32).to_le_bytes())?;
    out.write_all(text.as_bytes())
}

#[cfg(target_os = "linux")]
fn read_frames(mut bytes: &[u8], expected: usize) -> Result<Vec<Result<String>>> {
    let garbled = || EngineError::ChatTemplate("the renderer's answer is garbled".into());
    let mut rendered = Vec::with_capacity(expected);
    while let [tag, rest @ ..] = bytes {
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(garbled)?;
        let len = u32::from_le_bytes(*len) as usize;
        let text = rest.get(..len).ok_or_else(garbled)?;
        let text = String::from_utf8(text.to_vec()).map_err(|_| garbled())?;
        rendered.push(if *tag == 0 { Ok(text) } else { Err(EngineError::ChatTemplate(text)) });
        bytes = &rest[len..];
    }
    if rendered.len() != expected {
        return Err(garbled());
    }
    Ok(rendered)
}

/// A buffer that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct BoundedOutput(Vec<u8>);

impl std::io::Write for BoundedOutput {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + bytes.len() > MAX_OUTPUT_BYTES {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The subset of C `strftime` that chat templates use for today's date (UTC).
fn strftime_now(format: &str) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_python_methods_and_trimmed_blocks() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}\n[{{ m.role.upper() }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[A]{% endif %}",
            Some("<s>"),
            None,
        )
        .unwrap();
        let out = t.render(&[ChatMessage::new("user", "  hi ")], true).unwrap();
        assert_eq!(out, "<s>[USER] hi\n[A]");
    }

    #[test]
    fn hostile_templates_fail_cleanly() {
        let t = ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", None, None).unwrap();
        assert!(t.render_in_this_process(&[], false).is_err());
        // Output past the limit stops at the limit (a thousand writes of 64 KiB, within the fuel).
        let t = ChatTemplate::new("{% for i in range(1000) %}{{ '0123456789abcdef' * 4096 }}{% endfor %}", None, None).unwrap();
        let error = t.render_in_this_process(&[], false).unwrap_err().to_string();
        assert!(error.contains("exceeds"), "{error}");
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        assert!(t.render_in_this_process(&[], false).unwrap_err().to_string().contains("no system role"));
    }

    /// Values that double or square on each step would reach terabytes within a few dozen
    /// instructions; the fuel charges their bytes and items and ends them near 64 MB, in this
    /// process already. (What the fuel does not see is the next test's.)
    #[test]
    fn hostile_templates_cannot_grow_values_without_bound() {
        let growing = [
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "{% macro grow(s, n) %}{% if n > 0 %}{{ grow(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ grow('xxxxxxxx', 64) }}",
            "{% set a = 'x' * 4000 %}{% set b = a|replace('x', a) %}{{ b|replace('x', b)|length }}",
            "{% set a = 'x' * 4000 %}{% set b = a.replace('x', a) %}{{ b.replace('x', b)|length }}",
            // Lists concatenate lazily (2^32 items here, in 33 values), and iterating them is charged.
            "{% set ns = namespace(l=[1]) %}{% for i in range(32) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|join(',')|length }}",
            "{{ ('x' * 10000000)|join(',')|length }}",
        ];
        for source in growing {
            let t = ChatTemplate::new(source, None, None).unwrap();
            let error = t.render_in_this_process(&[], false).expect_err(source).to_string();
            assert!(error.contains("fuel"), "{source}: {error}");
        }
    }

    /// minijinja 3.1.0 materializes a list concatenated with itself more than 32 times, and
    /// serializes a huge lazy list, before charging fuel: the renderer's own process ends them,
    /// at its memory limit or, when the list grows too slowly for that, its silence limit.
    #[cfg(target_os = "linux")]
    #[test]
    fn templates_that_allocate_before_fuel_is_charged_end_in_a_clear_error() {
        let hostile = [
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
            "{% set ns = namespace(l=range(4096)|list) %}{% for i in range(20) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|tojson|length }}",
        ];
        std::thread::scope(|scope| {
            for source in hostile {
                scope.spawn(move || {
                    let t = ChatTemplate::new(source, None, None).unwrap();
                    let error = t.render(&[], false).expect_err(source).to_string();
                    assert!(error.contains("256 MiB of memory") || error.contains("without an answer"), "{source}: {error}");
                });
            }
        });
    }

    #[test]
    fn every_conversation_gets_its_own_rendering_or_error() {
        let t =
            ChatTemplate::new("{% if messages|length > 1 %}{{ raise_exception('one at a time') }}{% endif %}{{ messages[0].content }}", None, None).unwrap();
        let (one, two) = ([ChatMessage::new("user", "a")], [ChatMessage::new("user", "b"), ChatMessage::new("user", "c")]);
        let rendered = t.render_all(&[(&one, false), (&two, false), (&one, true)]).unwrap();
        assert_eq!(rendered.len(), 3);
        assert_eq!(rendered[0].as_deref().unwrap(), "a");
        assert!(rendered[1].as_ref().unwrap_err().to_string().contains("one at a time"));
        assert_eq!(rendered[2].as_deref().unwrap(), "a");
        assert!(t.render_all(&[]).unwrap().is_empty());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
