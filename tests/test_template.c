/* test_template.c - chat-template engine: every case of ../shared/testdata/chat-templates/ (*.json)
 * (real templates, expected strings made by jinja2 as transformers configures it) must render
 * byte-exact or fail with the expected message; plus language semantics, error reporting, limits
 * and the built-in templates. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "testutil.h"
#include "forge.h"

#define FIXED_NOW 1768435200 /* 2026-01-15 00:00:00 UTC, as the references were made */

/* Render src with messages; returns malloc'd output or NULL (error in *err / *detail). */
static char *render(const char *src, const char *messages, bool gen, const char *bos,
                    const char *eos, const char *extra, forge_template_error *detail,
                    forge_err *err)
{
    forge_template *t = NULL;
    char *out = NULL;
    if (forge_template_parse(src, strlen(src), &t, NULL, err) != FORGE_OK) return NULL;
    forge_template_vars v = {0};
    v.messages_json = messages ? messages : "[]";
    v.add_generation_prompt = gen;
    v.bos_token = bos;
    v.eos_token = eos;
    v.extra_json = extra;
    v.now = FIXED_NOW;
    forge_template_render(t, &v, &out, NULL, detail, err);
    forge_template_free(t);
    return out;
}

static void expect(const char *src, const char *want)
{
    forge_err err = {0};
    char *out = render(src, NULL, false, NULL, NULL, NULL, NULL, &err);
    if (!out) fail_msg("template %s failed: %s", src, err.msg);
    if (strcmp(out, want)) fail_msg("template %s\n  got  [%s]\n  want [%s]", src, out, want);
    free(out);
}

static void expect_error(const char *src, const char *type, const char *msg_part)
{
    forge_err err = {0};
    forge_template_error d = {0};
    char *out = render(src, NULL, false, NULL, NULL, NULL, &d, &err);
    if (out) fail_msg("template %s rendered [%s], expected an error", src, out);
    assert_int_not_equal(err.code, FORGE_OK);
    if (type && d.type[0] && strcmp(d.type, type))
        fail_msg("template %s: error type %s, want %s (%s)", src, d.type, type, err.msg);
    if (msg_part && !strstr(err.msg, msg_part))
        fail_msg("template %s: error '%s' lacks '%s'", src, err.msg, msg_part);
}

/* ---- the shared reference cases ---------------------------------------------------------- */
static void test_shared_cases(void **state)
{
    (void)state;
    char *dir = tu_require_shared("testdata/chat-templates");
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    int n_files = 0, n_cases = 0, n_fail = 0;
    while ((e = readdir(d))) {
        size_t nl = strlen(e->d_name);
        if (nl < 6 || strcmp(e->d_name + nl - 5, ".json") ||
            !strcmp(e->d_name, "conversations.json"))
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        char *json = tu_read_file(path, NULL);
        assert_non_null(json);
        cJSON *root = cJSON_Parse(json);
        free(json);
        if (!root) fail_msg("%s: not JSON", path);
        const cJSON *tf = cJSON_GetObjectItemCaseSensitive(root, "template_file");
        const cJSON *cases = cJSON_GetObjectItemCaseSensitive(root, "cases");
        if (!cJSON_IsString(tf) || !cJSON_IsArray(cases)) { /* not a reference file */
            cJSON_Delete(root);
            continue;
        }
        snprintf(path, sizeof path, "%s/%s", dir, tf->valuestring);
        size_t src_len = 0;
        char *src = tu_read_file(path, &src_len);
        assert_non_null(src);
        forge_template *t = NULL;
        forge_err err = {0};
        int line = 0;
        int prc = forge_template_parse(src, src_len, &t, &line, &err);
        n_files++;
        const cJSON *c;
        cJSON_ArrayForEach(c, cases)
        {
            const char *name = cJSON_GetObjectItemCaseSensitive(c, "name")->valuestring;
            const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(c, "messages");
            const cJSON *gen = cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt");
            const cJSON *bos = cJSON_GetObjectItemCaseSensitive(c, "bos_token");
            const cJSON *eos = cJSON_GetObjectItemCaseSensitive(c, "eos_token");
            const cJSON *want = cJSON_GetObjectItemCaseSensitive(c, "expected_output");
            const cJSON *want_err = cJSON_GetObjectItemCaseSensitive(c, "expected_error");
            n_cases++;
            if (prc != FORGE_OK) {
                print_message("FAIL %s %s: parse error: %s\n", tf->valuestring, name, err.msg);
                n_fail++;
                continue;
            }
            char *mj = cJSON_PrintUnformatted(msgs);
            forge_template_vars v = {0};
            v.messages_json = mj;
            v.add_generation_prompt = cJSON_IsTrue(gen);
            v.bos_token = cJSON_IsString(bos) ? bos->valuestring : NULL;
            v.eos_token = cJSON_IsString(eos) ? eos->valuestring : NULL;
            v.extra_json = "{\"tools\": null, \"documents\": null}";
            v.now = FIXED_NOW;
            char *out = NULL;
            size_t out_len = 0;
            forge_template_error det = {0};
            forge_err rerr = {0};
            int rc = forge_template_render(t, &v, &out, &out_len, &det, &rerr);
            if (cJSON_IsString(want)) {
                size_t wl = strlen(want->valuestring);
                if (rc != FORGE_OK) {
                    print_message("FAIL %s %s: %s\n", tf->valuestring, name, rerr.msg);
                    n_fail++;
                } else if (out_len != wl || memcmp(out, want->valuestring, wl)) {
                    size_t i = 0;
                    while (i < out_len && i < wl && out[i] == want->valuestring[i])
                        i++;
                    print_message("FAIL %s %s: output differs at byte %zu\n", tf->valuestring, name,
                                  i);
                    n_fail++;
                }
            } else if (cJSON_IsString(want_err)) {
                if (rc == FORGE_OK) {
                    print_message("FAIL %s %s: rendered, expected error '%s'\n", tf->valuestring,
                                  name, want_err->valuestring);
                    n_fail++;
                } else if (strcmp(det.message, want_err->valuestring)) {
                    print_message("FAIL %s %s: error '%s', expected '%s'\n", tf->valuestring, name,
                                  det.message, want_err->valuestring);
                    n_fail++;
                } else if (det.line <= 0 || !strstr(rerr.msg, "line")) {
                    print_message("FAIL %s %s: error without a template line: %s\n",
                                  tf->valuestring, name, rerr.msg);
                    n_fail++;
                }
            }
            free(out);
            cJSON_free(mj);
        }
        forge_template_free(t);
        free(src);
        cJSON_Delete(root);
    }
    closedir(d);
    free(dir);
    print_message("chat-template reference cases: %d files, %d cases, %d passed\n", n_files,
                  n_cases, n_cases - n_fail);
    assert_true(n_files > 0);
    assert_int_equal(n_fail, 0);
}

/* ---- language ---------------------------------------------------------------------------- */
static void test_whitespace(void **state)
{
    (void)state;
    expect("a\n{% if true %}\nb\n{% endif %}\nc", "a\nb\nc");         /* trim_blocks */
    expect("a\n    {% if true %}\nb\n    {% endif %}\nc", "a\nb\nc"); /* lstrip_blocks */
    expect("a  {%- if true -%}  b  {%- endif -%}  c", "abc");
    expect("x {{- ' y ' -}} z", "x y z");
    expect("  {{ 'v' }}\n", "  v"); /* one trailing newline dropped; vars not lstripped */
    expect("a\n\n", "a\n");
    expect("{# c #}\nx", "x");
    expect("  {%+ if true %}y{% endif %}", "  y");
    expect("a\r\nb", "a\nb");
    expect("{% raw %}{{ x }}{% endraw %}", "{{ x }}");
}

static void test_expressions(void **state)
{
    (void)state;
    expect("{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }}",
           "7 3 -4 1 2 1024");
    expect("{{ 7 / 2 }} {{ 4 / 2 }} {{ 0.1 + 0.2 }} {{ 1e16 }} {{ 1.5e-7 }} {{ 3.0 }}",
           "3.5 2.0 0.30000000000000004 1e+16 1.5e-07 3.0");
    expect("{{ 'a' ~ 1 ~ none ~ true }}", "a1NoneTrue");
    expect("{{ [1, 'a', none, true, 1.5] }} {{ {'k': 'v', 'n': [1]} }} {{ (1,) }}",
           "[1, 'a', None, True, 1.5] {'k': 'v', 'n': [1]} (1,)");
    expect("{{ \"it's\" }} {{ [\"it's\"] }} {{ ['a\\nb'] }}", "it's [\"it's\"] ['a\\nb']");
    expect("{{ 'abcdef'[1:3] }} {{ 'abcdef'[::-1] }} {{ [1,2,3,4][-2:] }} {{ 'héllo'[1] }}",
           "bc fedcba [3, 4] é");
    expect("{{ 1 < 2 < 3 }} {{ 'b' > 'a' }} {{ 1 == 1.0 }} {{ 'a' in 'cat' }} {{ 2 not in [1] }}",
           "True True True True True");
    expect("{{ 0 or 'x' }} {{ 1 and 'y' }} {{ not none }} {{ 'a' if false else 'b' }}",
           "x y True b");
    expect("{{ x is defined }} {{ none is none }} {{ 'a' is string }} {{ {} is mapping }} "
           "{{ [] is iterable }} {{ 3 is odd }} {{ 1 is equalto 1 }} {{ 'x' is in 'xy' }}",
           "False True True True True True True True");
    expect("{{ '\\u00e9\\x41\\t|' }}", "\xc3\xa9"
                                       "A\t|");
}

static void test_statements(void **state)
{
    (void)state;
    expect("{% for x in [1,2,3] %}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
           ",{% endfor %}",
           "0TrueFalse3,1FalseFalse3,2FalseTrue3,");
    expect("{% for x in [] %}a{% else %}empty{% endfor %}", "empty");
    expect("{% for x in range(10) if x is even %}{{ x }}{% endfor %}", "02468");
    expect("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}", "a=1;b=2;");
    expect("{% for x in range(5) %}{% if x == 3 %}{% break %}{% endif %}{{ x }}{% endfor %}",
           "012");
    expect("{% for x in range(4) %}{% if x is odd %}{% continue %}{% endif %}{{ x }}{% endfor %}",
           "02");
    expect("{% set x = 1 %}{% for i in range(2) %}{% set x = 5 %}{% endfor %}{{ x }}", "1");
    expect("{% set ns = namespace(x=1) %}{% for i in range(3) %}{% set ns.x = ns.x + i %}"
           "{% endfor %}{{ ns.x }}",
           "4");
    expect("{% set a, b = 1, 2 %}{{ a }}{{ b }}", "12");
    expect("{% set s %}in{{ 1 }}{% endset %}[{{ s }}]", "[in1]");
    expect("{% macro m(a, b='d') %}{{ a }}-{{ b }}{% endmacro %}{{ m(1) }} {{ m(2, b=3) }}",
           "1-d 2-3");
    expect("{% macro w() %}<{{ caller() }}>{% endmacro %}{% call w() %}body{% endcall %}",
           "<body>");
    expect("{% filter upper %}abc{% endfilter %}", "ABC");
    expect("{% if false %}a{% elif true %}b{% else %}c{% endif %}", "b");
}

static void test_filters_methods(void **state)
{
    (void)state;
    expect(
        "{{ '  a b  ' | trim }}|{{ 'ab' | upper }}|{{ 'AB' | lower }}|{{ 'hello world' | title }}"
        "|{{ 'hELLO' | capitalize }}",
        "a b|AB|ab|Hello World|Hello");
    expect("{{ [1,2,3] | length }} {{ 'héllo' | length }} {{ [1,2] | first }} {{ [1,2] | last }} "
           "{{ [1,2] | join(', ') }} {{ 'aXa' | replace('a', 'b') }}",
           "3 5 1 2 1, 2 bXb");
    expect("{{ {'a': [1, 2.5, 'é\"'], 'b': none, 'c': true} | tojson }}",
           "{\"a\": [1, 2.5, \"é\\\"\"], \"b\": null, \"c\": true}");
    expect("{{ {'a': [1, {}]} | tojson(indent=2) }}", "{\n  \"a\": [\n    1,\n    {}\n  ]\n}");
    expect("{{ x | default('d') }} {{ '' | default('e', true) }} {{ '3' | int + 1 }} "
           "{{ 'x' | int }} {{ 1 | string ~ 2 }} {{ 2.7 | int }}",
           "d e 4 0 12 2");
    expect("{% set m = [{'r': 'u', 'c': 1}, {'r': 'a', 'c': 2}, {'r': 'u', 'c': 3}] %}"
           "{{ m | selectattr('r', 'equalto', 'u') | map(attribute='c') | list }} "
           "{{ m | rejectattr('r', 'equalto', 'u') | map(attribute='c') | join }} "
           "{{ m | map(attribute='r') | unique | list }}",
           "[1, 3] 2 ['u', 'a']");
    expect("{{ [3,1,2] | sort }} {{ ['b','A','c'] | sort }} {{ [1,2] | reverse | list }} "
           "{{ {'b':1,'a':2} | dictsort }} {{ [1,2,3] | sum }}",
           "[1, 2, 3] ['A', 'b', 'c'] [2, 1] [('a', 2), ('b', 1)] 6");
    expect("{{ ' a b '.strip() }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|"
           "{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith(('x', 'c')) }}|{{ 'xxa'.lstrip('x') }}|"
           "{{ 'hello world'.title() }}|{{ 'a-b'.replace('-', '+') }}",
           "a b|['a', 'b', '', 'c']|['a', 'b']|True|True|a|Hello World|a+b");
    expect("{{ {'a': 1}.get('a') }} {{ {'a': 1}.get('b', 2) }} {{ {'a': 1}.keys() | list }} "
           "{{ {'a': 1}['a'] }} {{ {'a': 1}.a }}",
           "1 2 ['a'] 1 1");
    expect("{{ strftime_now('%d %b %Y') }}", "15 Jan 2026");
    expect("{{ '%s-%d' % ('a', 3) }} {{ '{}+{}'.format(1, 'x') }}", "a-3 1+x");
}

/* ---- errors ------------------------------------------------------------------------------ */
static void test_errors(void **state)
{
    (void)state;
    /* raise_exception: message and line */
    forge_err err = {0};
    forge_template_error d = {0};
    char *out = render("line1\n{{ raise_exception('bad ' ~ 'role') }}", NULL, false, NULL, NULL,
                       NULL, &d, &err);
    assert_null(out);
    assert_string_equal(d.type, "TemplateError");
    assert_string_equal(d.message, "bad role");
    assert_int_equal(d.line, 2);
    assert_non_null(strstr(err.msg, "line 2"));

    /* syntax errors: a message with the line, never a crash */
    forge_template *t = NULL;
    int line = 0;
    const char *bad[] = {"a\n{% if x %}",
                         "{{ 1 + }}",
                         "{% for %}",
                         "{{ x",
                         "{% endfor %}",
                         "{% unknown %}",
                         "{{ 'abc }}",
                         "{# open",
                         "{{ (1 }}",
                         "{{ a.}}",
                         "{% macro m( %}{% endmacro %}",
                         "\n\n{{ ) }}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&err, 0, sizeof err);
        int rc = forge_template_parse(bad[i], strlen(bad[i]), &t, &line, &err);
        if (rc == FORGE_OK) fail_msg("'%s' parsed", bad[i]);
        assert_int_equal(rc, FORGE_E_FORMAT);
        assert_null(t);
        assert_non_null(strstr(err.msg, "template line"));
    }
    memset(&err, 0, sizeof err);
    forge_template_parse("\n\n{{ ) }}", 8, &t, &line, &err);
    assert_int_equal(line, 3);

    /* runtime errors that Jinja raises */
    expect_error("{{ x.y }}", "UndefinedError", "'x' is undefined");
    expect_error("{{ 1 + 'a' }}", "TypeError", NULL);
    expect_error("{{ 1 // 0 }}", "ZeroDivisionError", NULL);
    expect_error("{{ [].append(1) }}", "SecurityError", NULL);
    expect_error("{{ x | tojson }}", "TypeError", NULL);
    expect_error("{{ none | length }}", "TypeError", NULL);
    expect_error("{% set x = 1 %}{% set x.y = 2 %}", NULL, "namespace");
    /* undefined is lenient where Jinja is */
    expect("{{ x }}|{{ x | length }}|{{ x is none }}|{% for i in x %}a{% endfor %}|{{ {}.a is "
           "defined }}",
           "|0|False||False");
    expect_error("{{ m.a is defined }}", "UndefinedError", "'m' is undefined");
}

static void test_bad_messages(void **state)
{
    (void)state;
    const char *src = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}";
    const char *bad[][2] = {{"not json", "not valid JSON"},
                            {"{\"role\": \"user\"}", "array"},
                            {"[{\"content\": \"x\"}]", "messages[0]: missing \"role\""},
                            {"[{\"role\": \"user\"}]", "messages[0]: missing \"content\""},
                            {"[{\"role\": 1, \"content\": \"x\"}]", "\"role\" must be a string"},
                            {"[\"x\"]", "messages[0]"},
                            {"[{\"role\": \"user\", \"content\": \"x\"},]", "not valid JSON"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        forge_err err = {0};
        char *out = render(src, bad[i][0], false, NULL, NULL, NULL, NULL, &err);
        if (out) fail_msg("messages %s accepted", bad[i][0]);
        assert_int_equal(err.code, FORGE_E_INVALID);
        if (!strstr(err.msg, bad[i][1])) fail_msg("'%s': message '%s'", bad[i][0], err.msg);
        assert_int_equal(forge_template_check_messages(bad[i][0], NULL), FORGE_E_INVALID);
    }
    forge_err err = {0};
    char *out = render(src, "[{\"role\": \"user\", \"content\": \"hi \\u00e9\\ud83d\\ude00\"}]",
                       false, NULL, NULL, NULL, NULL, &err);
    assert_non_null(out);
    assert_string_equal(out, "user:hi \xc3\xa9\xf0\x9f\x98\x80;");
    free(out);
}

/* ---- limits: pathological templates end with an error, quickly ------------------------- */
static void test_limits(void **state)
{
    (void)state;
    expect_error("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                 "LimitError", NULL);
    expect_error("{{ range(1000000) | length }}", "OverflowError", NULL);
    expect_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "LimitError", NULL);
    expect_error("{{ 'x' * 100000000 }}", "LimitError", NULL);
    expect_error("{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 "LimitError", NULL);
    /* deep nesting is a parse error, not a stack overflow */
    static char deep[8192];
    size_t n = (size_t)sprintf(deep, "{{ ");
    for (int i = 0; i < 1000; i++)
        deep[n++] = '(';
    deep[n++] = '1';
    for (int i = 0; i < 1000; i++)
        deep[n++] = ')';
    n += (size_t)sprintf(deep + n, " }}");
    forge_template *t = NULL;
    forge_err err = {0};
    assert_int_not_equal(forge_template_parse(deep, n, &t, NULL, &err), FORGE_OK);
    n = 0;
    for (int i = 0; i < 500; i++)
        n += (size_t)sprintf(deep + n, "{%% if 1 %%}");
    assert_int_not_equal(forge_template_parse(deep, n, &t, NULL, &err), FORGE_OK);
    assert_null(t);
}

/* ---- built-ins and model templates ------------------------------------------------------ */
static void test_builtins(void **state)
{
    (void)state;
    const char *msgs = "[{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", "
                       "\"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}, "
                       "{\"role\": \"user\", \"content\": \"Q\"}]";
    struct {
        const char *name, *want;
    } cases[] = {
        {"chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                   "<|im_start|>assistant\n"},
        {"llama2", "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] Q [/INST]"},
        {"llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"},
        {"gemma", "<s><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\nYo"
                  "<end_of_turn>\n<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n"},
        {"mistral", "<s>[INST] S\n\nHi [/INST]Yo</s>[INST] Q [/INST]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        forge_template *t = NULL;
        forge_err err = {0};
        assert_int_equal(forge_template_builtin(cases[i].name, &t, &err), FORGE_OK);
        forge_template_vars v = {.messages_json = msgs,
                                 .add_generation_prompt = true,
                                 .bos_token = "<s>",
                                 .eos_token = "</s>"};
        char *out = NULL;
        assert_int_equal(forge_template_render(t, &v, &out, NULL, NULL, &err), FORGE_OK);
        if (strcmp(out, cases[i].want))
            fail_msg("%s:\n got  [%s]\n want [%s]", cases[i].name, out, cases[i].want);
        free(out);
        forge_template_free(t);
    }
    forge_template *t = NULL;
    assert_int_equal(forge_template_builtin("nope", &t, NULL), FORGE_E_NOTFOUND);

    /* a model template that does not parse: fallback with a warning */
    forge_template_model m = {0};
    m.chat_template = (char *)"{% if %}";
    m.arch = (char *)"llama";
    m.bos_token = (char *)"<s>";
    char warn[700];
    const char *desc = NULL;
    forge_err err = {0};
    assert_int_equal(forge_template_select(&m, NULL, &t, &desc, warn, sizeof warn, &err), FORGE_OK);
    assert_non_null(t);
    assert_string_equal(desc, "llama2");
    assert_non_null(strstr(warn, "cannot be used"));
    forge_template_free(t);
    /* an explicit choice wins */
    assert_int_equal(forge_template_select(&m, "chatml", &t, &desc, warn, sizeof warn, &err),
                     FORGE_OK);
    assert_string_equal(desc, "chatml");
    forge_template_free(t);
    assert_int_equal(
        forge_template_select(&m, "/nonexistent/x.jinja", &t, &desc, warn, sizeof warn, &err),
        FORGE_E_NOTFOUND);
}

static void test_model_file(void **state)
{
    (void)state;
    char *path = tu_require_shared("testdata/models/stories260K.gguf");
    gguf_ctx *g = NULL;
    forge_err err = {0};
    assert_int_equal(gguf_open(path, &g, &err), FORGE_OK);
    forge_template_model m = {0};
    assert_int_equal(forge_template_model_read(g, &m, &err), FORGE_OK);
    assert_non_null(m.bos_token);
    assert_string_equal(m.bos_token, "<s>");
    assert_string_equal(m.eos_token, "</s>");
    forge_template *t = NULL;
    const char *desc = NULL;
    assert_int_equal(forge_template_select(&m, NULL, &t, &desc, NULL, 0, &err), FORGE_OK);
    assert_non_null(desc);
    forge_template_free(t);
    forge_template_model_clear(&m);
    gguf_close(g);
    free(path);
}

/* a copy of stories260K.gguf with tokenizer.chat_template set to tmpl */
static int copy_fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                     int64_t n_rows, void *dst, forge_err *err)
{
    (void)index;
    const gguf_tensor_info *src = gguf_find_tensor((const gguf_ctx *)user, info->name);
    if (!src) return FORGE_E_NOTFOUND;
    size_t row = ggml_row_size(info->type, info->ne[0]);
    memcpy(dst, (const char *)src->data + (size_t)row0 * row, (size_t)n_rows * row);
    (void)err;
    return FORGE_OK;
}

static char *model_with_template(const char *dir, const char *src_path, const char *tmpl)
{
    gguf_ctx *g = NULL;
    gguf_writer *w = NULL;
    forge_err err = {0};
    char *out = malloc(strlen(dir) + 32);
    sprintf(out, "%s/with_template.gguf", dir);
    assert_int_equal(gguf_open(src_path, &g, &err), FORGE_OK);
    assert_int_equal(gguf_writer_create(&w, &err), FORGE_OK);
    assert_int_equal(gguf_writer_copy_kvs(w, g, "", NULL, &err), FORGE_OK);
    assert_int_equal(gguf_writer_set_str(w, "tokenizer.chat_template", tmpl, &err), FORGE_OK);
    for (int64_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor_info *t = gguf_tensor(g, i);
        assert_int_equal(gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, &err),
                         FORGE_OK);
    }
    if (gguf_writer_write(w, out, copy_fill, g, 0, &err) != FORGE_OK) fail_msg("%s", err.msg);
    gguf_writer_free(w);
    gguf_close(g);
    return out;
}

/* A model whose template does not parse still loads; the built-in fallback is used with a
 * warning. A model whose template parses gets it. */
static void test_model_templates(void **state)
{
    (void)state;
    char *src = tu_require_shared("testdata/models/stories260K.gguf");
    char *dir = tu_mkdtemp();
    const char *cases[][2] = {
        {"{% for m in messages %}{{ m.content }", NULL},
        {"{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", "[user]hi"}};
    for (int k = 0; k < 2; k++) {
        char *path = model_with_template(dir, src, cases[k][0]);
        forge_model *m = NULL;
        forge_err err = {0};
        if (forge_model_load(path, &m, &err) != FORGE_OK) fail_msg("model load: %s", err.msg);
        forge_template_model tm = {0};
        assert_int_equal(forge_template_model_read(forge_model_gguf(m), &tm, &err), FORGE_OK);
        assert_string_equal(tm.chat_template, cases[k][0]);
        forge_template *t = NULL;
        const char *desc = NULL;
        char warn[700];
        assert_int_equal(forge_template_select(&tm, NULL, &t, &desc, warn, sizeof warn, &err),
                         FORGE_OK);
        forge_template_vars v = {.messages_json = "[{\"role\": \"user\", \"content\": \"hi\"}]"};
        char *out = NULL;
        assert_int_equal(forge_template_render(t, &v, &out, NULL, NULL, &err), FORGE_OK);
        if (cases[k][1]) {
            assert_string_equal(desc, "model");
            assert_string_equal(warn, "");
            assert_string_equal(out, cases[k][1]);
        } else {
            assert_string_equal(desc, "llama2");
            assert_non_null(strstr(warn, "template line 1"));
            assert_non_null(strstr(out, "[INST] hi [/INST]"));
        }
        free(out);
        forge_template_free(t);
        forge_template_model_clear(&tm);
        forge_model_free(m);
        remove(path);
        free(path);
    }
    tu_rmtree(dir);
    free(dir);
    free(src);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shared_cases),    cmocka_unit_test(test_whitespace),
        cmocka_unit_test(test_expressions),     cmocka_unit_test(test_statements),
        cmocka_unit_test(test_filters_methods), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_bad_messages),    cmocka_unit_test(test_limits),
        cmocka_unit_test(test_builtins),        cmocka_unit_test(test_model_file),
        cmocka_unit_test(test_model_templates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
