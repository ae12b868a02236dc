use super::*;

const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn user(text: &str) -> ChatMessage {
    ChatMessage::new("user", text)
}

#[test]
fn renders_a_chatml_template() {
    let t = ChatTemplate::new(SMOL, "<|im_start|>", "<|im_end|>").unwrap();
    let out = t.render(&[user("Hi")], true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let out = t
        .render(&[ChatMessage::new("system", "S"), user("Hi")], false)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn whitespace_control_and_python_methods_match_jinja2() {
    // Rendered by Python's jinja2 with trim_blocks/lstrip_blocks: '[hi]\n<s>'.
    let src = "{% for m in messages %}\n  {% if m.role == \"user\" %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}\n{{- bos_token }}";
    let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
    let out = t
        .render(&[user("  hi  "), ChatMessage::new("x", "y")], false)
        .unwrap();
    assert_eq!(out, "[hi]\n<s>");

    let src = "{{ messages[0].content.startswith('a') }} {{ messages[0].content.split(',') | join('|') }} {% for k, v in {'x': 1}.items() %}{{ k }}={{ v }}{% endfor %} {{ messages[0].content.upper() }}";
    let out = ChatTemplate::new(src, "", "")
        .unwrap()
        .render(&[user("a,b")], false)
        .unwrap();
    // Python prints booleans as True/False.
    assert_eq!(out, "True a|b x=1 A,B");
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    let src = r#"{{ {"a": 1, "b": [1, 2.5, "x\"é
"], "c": {}, "d": none, "e": true, "f": 1.0} | tojson }}"#;
    let out = ChatTemplate::new(src, "", "")
        .unwrap()
        .render(&[], false)
        .unwrap();
    assert_eq!(
        out,
        r#"{"a": 1, "b": [1, 2.5, "x\"é\n"], "c": {}, "d": null, "e": true, "f": 1.0}"#
    );
    let src = r#"{{ {"a": 1, "b": [1, 2]} | tojson(indent=2) }}"#;
    let out = ChatTemplate::new(src, "", "")
        .unwrap()
        .render(&[], false)
        .unwrap();
    assert_eq!(out, "{\n  \"a\": 1,\n  \"b\": [\n    1,\n    2\n  ]\n}");
    // Messages keep their field order (role, then content), as Python dicts do.
    let out = ChatTemplate::new("{{ messages | tojson }}", "", "")
        .unwrap()
        .render(&[user("<hi>")], false)
        .unwrap();
    assert_eq!(out, r#"[{"role": "user", "content": "<hi>"}]"#);
}

#[test]
fn extra_variables_reach_the_template() {
    let t = ChatTemplate::new(
        "{% if tools %}{{ tools | length }} tools{% endif %}",
        "",
        "",
    )
    .unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "tools".into(),
        serde_json::json!([{"name": "a"}, {"name": "b"}]),
    );
    assert_eq!(t.render_with(&[], false, &extra).unwrap(), "2 tools");
    assert_eq!(t.render(&[], false).unwrap(), "");
}

#[test]
fn raise_exception_is_reported_as_the_templates_message() {
    let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert_eq!(t.render(&[user("x")], false).unwrap(), "ok");
    let e = t
        .render(&[ChatMessage::new("assistant", "x")], false)
        .unwrap_err();
    assert!(
        matches!(&e, ChatError::Raised(m) if m.starts_with("Conversation roles must alternate")),
        "{e}"
    );
}

#[test]
fn malformed_templates_are_errors() {
    for src in ["{% for m in messages %}", "{{ 'a' + }}", "{% endif %}"] {
        let e = ChatTemplate::new(src, "", "").unwrap_err();
        assert!(matches!(e, ChatError::Syntax(_)), "{src}: {e}");
    }
    let e = ChatTemplate::new("{% if x %}\n\n{% endfor %}", "", "").unwrap_err();
    assert!(e.to_string().contains("line 3"), "{e}");
    // Errors that only show when rendering.
    for src in [
        "{{ messages[0]['role'] + 1 }}",
        "{{ messages[5].content.strip() }}",
        "{{ messages[0].content.nosuchmethod() }}",
        "{{ x | nosuchfilter }}",
    ] {
        let t = ChatTemplate::new(src, "", "").unwrap();
        let e = t.render(&[user("x")], false).unwrap_err();
        assert!(matches!(e, ChatError::Render(_)), "{src}: {e}");
    }
}

#[test]
fn openai_messages_are_validated() {
    let ok = serde_json::json!([
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": null}
    ]);
    let msgs = ChatMessage::from_openai(&ok).unwrap();
    assert_eq!(msgs[1], user("a\nb"));
    assert_eq!(msgs[2].content, "");
    let bad = [
        (serde_json::json!({"role": "user"}), 0),
        (serde_json::json!([{"content": "x"}]), 0),
        (
            serde_json::json!([{"role": "user", "content": "x"}, {"role": 5, "content": "x"}]),
            1,
        ),
        (serde_json::json!([{"role": "user", "content": 5}]), 0),
        (
            serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            0,
        ),
        (
            serde_json::json!([{"role": "user", "content": [{"type": "text"}]}]),
            0,
        ),
    ];
    for (json, at) in bad {
        let e = ChatMessage::from_openai(&json).unwrap_err();
        assert!(
            matches!(e, ChatError::BadMessage { index, .. } if index == at),
            "{json}: {e}"
        );
    }
}

#[test]
fn strftime_matches_python() {
    // Expected values from Python's time.strftime on time.gmtime(t).
    let f = "%Y-%m-%d %H:%M:%S %a %A %b %B %j %I %p %y %e";
    assert_eq!(
        strftime(0, f),
        "1970-01-01 00:00:00 Thu Thursday Jan January 001 12 AM 70  1"
    );
    assert_eq!(
        strftime(1_700_000_000, f),
        "2023-11-14 22:13:20 Tue Tuesday Nov November 318 10 PM 23 14"
    );
    assert_eq!(
        strftime(951_782_400, f),
        "2000-02-29 00:00:00 Tue Tuesday Feb February 060 12 AM 00 29"
    );
    assert_eq!(
        strftime(4_102_444_799, f),
        "2099-12-31 23:59:59 Thu Thursday Dec December 365 11 PM 99 31"
    );
    let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "").unwrap();
    assert_eq!(t.render(&[], false).unwrap().len(), 11);
}

#[test]
fn a_template_that_runs_without_end_fails_instead_of_hanging() {
    let src = "{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}x";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let start = std::time::Instant::now();
    let e = t.render(&[user("hi")], true).unwrap_err();
    assert!(matches!(e, ChatError::Render(_)), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("fuel"), "{e}");
    // A long, real conversation still renders within the budget.
    let many: Vec<ChatMessage> = (0..2000).map(|i| user(&format!("message {i}"))).collect();
    let smol = ChatTemplate::new(SMOL, "<|im_start|>", "<|im_end|>").unwrap();
    assert!(smol.render(&many, true).is_ok());
    eprintln!("stopped after {:?}", start.elapsed());
}
