/* test_template_budget.c - the chat-template renderer's budgets (issue 10, "Hangs"): steps are
 * charged by the work an operation does (bytes scanned, compared, copied, allocated), a render
 * has a wall-clock budget with a clear error, and memory does not grow with loop iterations.
 * Hostile templates must end quickly with the right error; no test asserts a time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "forge.h"

typedef struct limits {
    uint64_t max_steps;
    uint32_t max_time_ms;
    size_t max_memory;
} limits;

/* Render src; returns malloc'd output or NULL with the error in *err / *detail. */
static char *render_with(const char *src, const char *messages, limits lim,
                         forge_template_error *detail, forge_err *err)
{
    forge_template *t = NULL;
    char *out = NULL;
    if (forge_template_parse(src, strlen(src), &t, NULL, err) != FORGE_OK)
        fail_msg("template does not parse: %s", err->msg);
    forge_template_vars v = {0};
    v.messages_json = messages ? messages : "[{\"role\": \"user\", \"content\": \"hi\"}]";
    v.max_steps = lim.max_steps;
    v.max_time_ms = lim.max_time_ms;
    v.max_memory = lim.max_memory;
    v.name = "hostile.jinja";
    forge_template_render(t, &v, &out, NULL, detail, err);
    forge_template_free(t);
    return out;
}

/* src must fail with a LimitError whose message contains want */
static void expect_limit(const char *src, limits lim, const char *want)
{
    forge_err err = {0};
    forge_template_error d = {0};
    char *out = render_with(src, NULL, lim, &d, &err);
    if (out) fail_msg("template %s rendered (%zu bytes), expected a LimitError", src, strlen(out));
    if (err.code != FORGE_E_RANGE || strcmp(d.type, "LimitError"))
        fail_msg("template %s: error %d %s (%s), want FORGE_E_RANGE LimitError", src, err.code,
                 d.type, err.msg);
    if (want && !strstr(err.msg, want))
        fail_msg("template %s: error '%s' lacks '%s'", src, err.msg, want);
}

static void expect_output(const char *src, limits lim, const char *want)
{
    forge_err err = {0};
    char *out = render_with(src, NULL, lim, NULL, &err);
    if (!out) fail_msg("template %s failed: %s", src, err.msg);
    if (strcmp(out, want))
        fail_msg("template %s\n  got  [%.200s]\n  want [%.200s]", src, out, want);
    free(out);
}

#define NO_TIME UINT32_MAX /* max_time_ms: no wall-clock budget */
#define NO_STEPS UINT64_MAX

static const char hostile_length[] = /* the first case: ~15 minutes before the fix */
    "{% set s = 'a' * 16000000 %}{% for i in range(100000) %}{{ s|length }}{% endfor %}";
static const char hostile_in[] = /* 38 ms per iteration before the fix */
    "{% set s = 'a' * 16000000 %}{% for i in range(100000) %}{% if 'zz' in s %}x{% endif %}"
    "{% endfor %}";

/* With the step limit out of the way, the wall-clock budget ends the render, with a message
 * that names the budget and the template. */
static void test_time_budget(void **state)
{
    (void)state;
    const char *want = "template render exceeded its time budget of 200 ms (hostile.jinja)";
    expect_limit(hostile_length, (limits){NO_STEPS, 200, 0}, want);
    expect_limit(hostile_in, (limits){NO_STEPS, 200, 0}, want);
    /* the message carries the template line */
    forge_err err = {0};
    forge_template_error d = {0};
    assert_null(render_with("x\n{% for i in range(100000) %}{% for j in range(100000) %}"
                            "{% endfor %}{% endfor %}",
                            NULL, (limits){NO_STEPS, 200, 0}, &d, &err));
    assert_int_equal(d.line, 2);
    assert_non_null(strstr(err.msg, "template line 2: LimitError: template render exceeded"));
}

/* With the default limits the hostile templates end too (steps charged by work, or the default
 * 1 s budget), never by running for minutes. */
static void test_default_limits(void **state)
{
    (void)state;
    expect_limit(hostile_length, (limits){0, 0, 0}, NULL);
    expect_limit(hostile_in, (limits){0, 0, 0}, NULL);
}

/* Steps are charged by bytes of work: each operation below on a 100 KB string (or a list of
 * 1000 strings) costs hundreds to thousands of steps, so 100000 iterations exceed 2,000,000 steps
 * (one alone does not); before the fix an iteration cost ~10 steps whatever the operation did,
 * and all of them rendered within the limit (taking minutes). The time budget is off, so this
 * is about step accounting alone. */
static void test_steps_charged_by_work(void **state)
{
    (void)state;
    static const char *const ops[] = {
        "{{ s|length }}",
        "{{ 'zz' in s }}",
        "{{ 'zz' not in s }}",
        "{{ s is in t }}",
        "{{ s.find('zz') }}",
        "{{ s.rfind('zz') }}",
        "{{ s.rfind('aab') }}",
        "{{ s.count('b') }}",
        "{{ s.replace('b', 'c')|length > 0 }}",
        "{{ (s|replace('b', 'c'))|length > 0 }}",
        "{{ s.split('b')|length }}",
        "{{ s.rsplit('b')|length }}",
        "{{ s.split()|length }}",
        "{{ s.splitlines()|length }}",
        "{{ s.partition('b')|length }}",
        "{{ s.startswith(t) }}",
        "{{ s.endswith(t) }}",
        "{{ s.startswith('a', 99999) }}",
        "{{ s == t }}",
        "{{ s != t }}",
        "{{ s < t }}",
        "{{ [s] == [t] }}",
        "{{ {'k': s} == {'k': t} }}",
        "{{ s[1:]|length > 0 }}",
        "{{ s[::2]|length > 0 }}",
        "{{ s[99999] }}",
        "{{ s.upper()|length > 0 }}",
        "{{ (s|lower)|length > 0 }}",
        "{{ s.strip('a')|length }}",
        "{{ s.strip()|length }}",
        "{{ (s|trim)|length }}",
        "{{ s.isalpha() }}",
        "{{ s.islower() }}",
        "{{ (s ~ '')|length > 0 }}",
        "{{ (s + 'x')|length > 0 }}",
        "{{ ('%s' % s)|length > 0 }}",
        "{{ s.format()|length > 0 }}",
        "{{ (s|tojson)|length > 0 }}",
        "{{ (l|string)|length > 0 }}",
        "{{ s|wordcount }}",
        "{{ (s|striptags)|length > 0 }}",
        "{{ (s|reverse)|length > 0 }}",
        "{{ (s|center(100100))|length > 0 }}",
        "{{ s is lower }}",
        "{{ l|unique|length }}",
        "{{ l|sort|length }}",
        "{{ 'x' in l }}",
        "{{ l.count('x') }}",
        "{{ (l|join(','))|length > 0 }}",
        "{{ (l + l)|length }}",
        "{{ (l * 2)|length }}",
        "{{ (l|list)|length }}",
    };
    char src[512];
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++) {
        /* l: 1000 distinct short strings; s, t: 100 KB strings */
        snprintf(src, sizeof src,
                 "{%% set s = 'a' * 100000 %%}{%% set t = 'a' * 99999 ~ 'b' %%}"
                 "{%% set l = range(1000)|map('string')|list %%}"
                 "{%% for i in range(100000) %%}%s{%% endfor %%}",
                 ops[i]);
        /* the same op once renders: the limit is about repetition, not a refusal */
        char once[512];
        snprintf(once, sizeof once,
                 "{%% set s = 'a' * 100000 %%}{%% set t = 'a' * 99999 ~ 'b' %%}"
                 "{%% set l = range(1000)|map('string')|list %%}%s",
                 ops[i]);
        forge_err err = {0};
        char *out = render_with(once, NULL, (limits){2000000, NO_TIME, 0}, NULL, &err);
        if (!out) fail_msg("op %s once: %s", ops[i], err.msg);
        free(out);
        expect_limit(src, (limits){2000000, NO_TIME, 0}, "exceeded 2000000 steps");
    }
    /* dicts are searched linearly: building one of n keys is n^2 comparisons, charged (no
     * wall-clock budget: under ASan on a busy machine it could end the render first) */
    expect_limit("{% set d = dict(range(40000)|map('string')|batch(2)|list) %}",
                 (limits){0, NO_TIME, 0}, "exceeded 5000000 steps");
    expect_output("{% set d = dict(range(400)|map('string')|batch(2)|list) %}{{ d|length }}"
                  "{{ d.get('398') }}{{ '2' in d }}{{ '3' in d }}",
                  (limits){0, 0, 0}, "200399TrueFalse");
    /* allocation is work too: one big repeat is charged by its size */
    expect_limit("{% set s = 'a' * 10000000 %}", (limits){100000, NO_TIME, 0},
                 "exceeded 100000 steps");
    expect_limit("{% set l = [1] * 5000000 %}", (limits){100000, NO_TIME, 0},
                 "exceeded 100000 steps");
}

/* printf-style formatting: printf takes time in proportion to the width and precision (3.8 s
 * for "%2000000000d", 57 s for "%.2000000000f", in one uninterruptible call) and the result was
 * cut at 255 bytes. */
static void test_percent_format(void **state)
{
    (void)state;
    limits def = {0, 0, 0};
    expect_limit("{{ '%2000000000d' % 1 }}", def, "format width or precision larger than");
    expect_limit("{{ '%.2000000000f' % 1.5 }}", def, "format width or precision larger than");
    expect_limit("{{ '%09999999999x' % 1 }}", def, "format width or precision larger than");
    expect_output("{{ ('%300d' % 1)|length }}|{{ ('%f' % 1e308)|length }}|{{ '%-5d|' % 42 }}"
                  "{{ '%05.1f' % 2.25 }}|{{ '%x' % 255 }}|{{ '%+d' % 3 }}",
                  def, "300|316|42   |002.2|ff|+3");
    forge_err err = {0};
    forge_template_error d = {0};
    assert_null(render_with("{{ '%1.2.3d' % 1 }}", NULL, def, &d, &err));
    assert_string_equal(d.type, "ValueError");
    /* found by fuzzing: a float beyond int64 given to %d was converted with undefined behaviour;
     * Python prints int(f) */
    expect_output("{{ '%d|%5d|%i' % (3.5e20, -2.5, 1e19) }}", def,
                  "350000000000000000000|   -2|10000000000000000000");
    assert_null(render_with("{{ '%x' % 1e300 }}", NULL, def, &d, &err));
    assert_string_equal(d.type, "OverflowError");
    assert_null(render_with("{{ '%d' % (1e400 - 1e400) }}", NULL, def, &d, &err));
    assert_string_equal(d.type, "ValueError");
}

/* Integer edges found while auditing the operations (UBSan): a slice step near INT64_MAX overflowed
 * the index (a segfault for lists, 'ba' for 'abc'[1::2**63-1]), and range() near the int64 limits
 * overflowed its loop counter. */
static void test_integer_edges(void **state)
{
    (void)state;
    limits def = {0, 0, 0};
    expect_output("{{ 'abc'[1::9223372036854775807] }}|{{ [1, 2, 3][1::9223372036854775807] }}|"
                  "{{ 'abc'[::-9223372036854775807] }}|{{ [1, 2][-9223372036854775807:] }}|"
                  "{{ 'abcdef'[::2] }}{{ 'abcdef'[::-2] }}{{ [1, 2, 3, 4][3:0:-2] }}",
                  def, "b|[2]|c|[1, 2]|acefdb[4, 2]");
    expect_output("{{ range(9223372036854775806, 9223372036854775807)|list }}"
                  "{{ range(0, 10, 9223372036854775807)|list }}"
                  "{{ range(-9223372036854775807, 9223372036854775807, 4611686018427387904)|list }}"
                  "{{ range(10, 0, -3)|list }}{{ range(5, 1)|list }}{{ range(-1, -6, -2)|list }}",
                  def,
                  "[9223372036854775806][0][-9223372036854775807, -4611686018427387903, 1, "
                  "4611686018427387905][10, 7, 4, 1][][-1, -3, -5]");
    forge_err err = {0};
    forge_template_error d = {0};
    assert_null(
        render_with("{{ range(-9223372036854775807, 9223372036854775807) }}", NULL, def, &d, &err));
    assert_string_equal(d.type, "OverflowError");
    /* truncate: length + leeway overflowed; `end` was read as a string whatever its type; and
     * jinja's default killwords=False (cut at the last space) */
    expect_output("{{ 'abcdefghij'|truncate(9223372036854775807) }}|"
                  "{{ 'foo bar baz qux'|truncate(9) }}|{{ 'foo bar baz qux'|truncate(9, true) }}|"
                  "{{ 'foo bar baz qux'|truncate(11, true, '.', 0) }}",
                  def, "abcdefghij|foo...|foo ba...|foo bar ba.");
    assert_null(render_with("{{ 'abcdefghijklmnop'|truncate(5, false, 5) }}", NULL, def, &d, &err));
    assert_string_equal(d.type, "TypeError");
    assert_null(render_with("{{ 'abcdefghij'|truncate(3, leeway=-9223372036854775807) }}", NULL,
                            def, &d, &err));
    assert_string_equal(d.type, "AssertionError");
}

/* Found by fuzzing: upper()/lower()/title() wrote past their buffer when the string had invalid
 * UTF-8 (each bad byte becomes U+FFFD, 3 bytes); ASan reports the overflow, and the output is
 * checked here. */
static void test_case_map_invalid_utf8(void **state)
{
    (void)state;
    limits def = {0, 0, 0};
    forge_err err = {0};
    static const char *const srcs[] = {"{{ s.upper() }}", "{{ s|lower }}", "{{ s.title() }}",
                                       "{{ s|capitalize }}", "{{ s.swapcase() }}"};
    char want[3 * 64 + 1] = "";
    for (int i = 0; i < 64; i++)
        strcat(want, "\xef\xbf\xbd");
    for (size_t k = 0; k < sizeof srcs / sizeof *srcs; k++) {
        char src[256];
        char bad[65];
        memset(bad, 0xff, 64);
        bad[64] = 0;
        snprintf(src, sizeof src, "{%% set s = '%s' %%}%s", bad, srcs[k]);
        char *out = render_with(src, NULL, def, NULL, &err);
        if (!out) fail_msg("%s: %s", srcs[k], err.msg);
        assert_string_equal(out, want);
        free(out);
    }
}

/* Comparing values nested thousands deep is a LimitError, not a stack overflow. */
static void test_deep_values(void **state)
{
    (void)state;
    expect_limit("{% set ns = namespace(a=[], b=[]) %}{% for i in range(20000) %}"
                 "{% set ns.a = [ns.a] %}{% set ns.b = [ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
                 (limits){0, 0, 0}, "nested deeper than");
    expect_limit("{% set ns = namespace(a=[], b=[]) %}{% for i in range(20000) %}"
                 "{% set ns.a = [ns.a] %}{% set ns.b = [ns.b] %}{% endfor %}{{ ns.a < ns.b }}",
                 (limits){0, 0, 0}, "nested deeper than");
    /* shallow nesting still compares */
    expect_output("{% set ns = namespace(a=[], b=[]) %}{% for i in range(100) %}"
                  "{% set ns.a = [ns.a] %}{% set ns.b = [ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
                  (limits){0, 0, 0}, "True");
}

/* Memory does not grow with loop iterations: 200000 iterations in 4 MB (the outer range
 * itself takes ~1 MB); before the fix each iteration kept its scope and values (~250 bytes),
 * 50 MB in all. */
static void test_loop_memory(void **state)
{
    (void)state;
    limits small = {NO_STEPS, NO_TIME, 4u << 20};
    expect_output("{% for i in range(20000) %}{% for j in range(10) %}{% endfor %}{% endfor %}",
                  small, "");
    expect_output("{% for i in range(50000) %}{% set x = i ~ 'abc' %}{% set y = [x, x] %}"
                  "{% endfor %}done",
                  small, "done");
    expect_output("{% for i in range(50000) if i is even %}{% endfor %}done", small, "done");
    /* scalars set on a namespace in a loop (the common pattern) keep no memory either (the
     * range itself takes ~5.6 MB; before, each iteration kept ~400 bytes: 40 MB) */
    expect_output("{% set ns = namespace(x=0, f=false, y=none) %}{% for i in range(100000) %}"
                  "{% set ns.x = ns.x + i %}{% set ns.f = i is even %}{% set ns.y = i / 2 %}"
                  "{% endfor %}{{ ns.x }} {{ ns.f }} {{ ns.y }}",
                  (limits){NO_STEPS, NO_TIME, 8u << 20}, "4999950000 False 49999.5");
    expect_output("{% macro m(x) %}{{ x }}{% endmacro %}{% for i in range(50000) %}"
                  "{% set y = m(i) %}{% endfor %}done",
                  small, "done");
    /* the case: an empty nested loop 100000 x 10 ends (or completes) without ever
     * hitting the memory limit */
    forge_err err = {0};
    char *out =
        render_with("{% for i in range(100000) %}{% for j in range(10) %}{% endfor %}{% endfor %}",
                    NULL, (limits){0, 0, 0}, NULL, &err);
    if (!out) {
        assert_int_equal(err.code, FORGE_E_RANGE);
        if (strstr(err.msg, "memory")) fail_msg("nested empty loop: %s", err.msg);
        assert_true(strstr(err.msg, "steps") || strstr(err.msg, "time budget"));
    }
    free(out);
    out =
        render_with("{% for i in range(100000) %}{% for j in range(10) %}{% endfor %}{% endfor %}",
                    NULL, (limits){NO_STEPS, NO_TIME, 16u << 20}, NULL, &err);
    if (!out) fail_msg("100000 x 10 empty loop in 16 MB: %s", err.msg);
    free(out);
}

/* What an iteration keeps (namespace attributes, output, captured blocks, cyclers) survives
 * the release of the iteration's memory. */
static void test_loop_values_survive(void **state)
{
    (void)state;
    limits def = {0, 0, 0};
    expect_output("{% set ns = namespace(l=[], s='') %}{% for i in range(5) %}"
                  "{% set ns.l = ns.l + [i ~ 'x'] %}{% set ns.s = ns.s ~ i %}{% endfor %}"
                  "{{ ns.l|join(',') }}|{{ ns.s }}",
                  def, "0x,1x,2x,3x,4x|01234");
    /* a namespace scalar is overwritten in place: what was read from it before keeps its value */
    expect_output("{% set ns = namespace(x=1) %}{% for i in range(3) %}{% set y = ns.x %}"
                  "{% set z = ns['x'] %}{% set ns.x = i + 10 %}{{ y }},{{ z }},{{ ns.x }};"
                  "{% endfor %}",
                  def, "1,1,10;10,10,11;11,11,12;");
    expect_output("{% set ns = namespace(x=1) %}{% set ns.x = 5 %}{% set it = ns|items|list %}"
                  "{% set d = dict(ns) %}{% set ns2 = namespace(ns) %}{% set l = [ns.x] %}"
                  "{% set ns.x = 6 %}{{ it }}|{{ d.x }}|{{ ns2.x }}|{{ l }}|{{ ns.x }}"
                  "{% set ns2.x = 7 %}|{{ ns.x }}{{ ns2.x }}",
                  def, "[('x', 5)]|5|5|[5]|6|67");
    expect_output("{% set ns = namespace(found=false) %}{% for m in messages %}"
                  "{% if m.role == 'user' %}{% set ns.found = m.content ~ '!' %}{% endif %}"
                  "{% endfor %}{{ ns.found }}",
                  def, "hi!");
    /* output written into a growing capture buffer from inside loops */
    char want[8192] = "", *w = want;
    for (int i = 0; i < 300; i++)
        w += sprintf(w, "abcdefgh%d", i);
    char want2[8300];
    snprintf(want2, sizeof want2, "%s|%zu", want, strlen(want));
    expect_output("{% macro m() %}{% for i in range(300) %}{{ 'abcdefgh' ~ i }}{% endfor %}"
                  "{% endmacro %}{% set x = m() %}{{ x }}|{{ x|length }}",
                  def, want2);
    expect_output("{% set x %}{% for i in range(300) %}{{ 'abcdefgh' ~ i }}{% endfor %}"
                  "{% endset %}{{ x }}|{{ x|length }}",
                  def, want2);
    expect_output("{% filter upper %}{% for i in range(3) %}{% for j in range(2) %}{{ i ~ j }}x"
                  "{% endfor %}{% endfor %}{% endfilter %}",
                  def, "00X01X10X11X20X21X");
    expect_output("{% set c = cycler('a', 'b') %}{% set j = joiner('+') %}{% for i in range(5) %}"
                  "{{ j() }}{{ c.next() }}{{ loop.cycle('x', 'y') }}{% endfor %}",
                  def, "ax+by+ax+by+ax");
    expect_output("{% for item in [[1, [2, 3]], [4]] recursive %}{% if item is iterable %}"
                  "({{ loop(item) }}){% else %}{{ item }}{% endif %}{% endfor %}",
                  def, "(1(23))(4)");
    expect_output("{% for i in range(3) %}{% for j in range(3) %}{% if j == 1 %}{% break %}"
                  "{% endif %}{{ i }}{{ j }}{% set k = i * j %}{% endfor %}{% endfor %}",
                  def, "001020");
}

/* A long but ordinary conversation still renders with the default limits: the charging is
 * about hostile work, not ordinary prompts (here ~1.3 MB through a real template). */
static void test_big_conversation(void **state)
{
    (void)state;
    char *path = tu_require_shared("testdata/chat-templates/Qwen-Qwen3-0.6B.jinja");
    char *src = tu_read_file(path, NULL);
    assert_non_null(src);
    size_t cap = 2u << 20, n = 0;
    char *msgs = malloc(cap);
    assert_non_null(msgs);
    n += (size_t)sprintf(msgs, "[");
    for (int i = 0; i < 320; i++) {
        n += (size_t)sprintf(msgs + n, "%s{\"role\": \"%s\", \"content\": \"", i ? "," : "",
                             i % 2 ? "assistant" : "user");
        for (int k = 0; k < 4000; k++)
            msgs[n++] = (char)('a' + (i + k) % 26);
        n += (size_t)sprintf(msgs + n, "\"}");
    }
    sprintf(msgs + n, "]");
    forge_err err = {0};
    char *out = render_with(src, msgs, (limits){0, 0, 0}, NULL, &err);
    if (!out) fail_msg("a long conversation fails: %s", err.msg);
    assert_true(strlen(out) > 320 * 4000);
    free(out);
    free(msgs);
    free(src);
    free(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_time_budget),           cmocka_unit_test(test_default_limits),
        cmocka_unit_test(test_steps_charged_by_work), cmocka_unit_test(test_deep_values),
        cmocka_unit_test(test_loop_memory),           cmocka_unit_test(test_loop_values_survive),
        cmocka_unit_test(test_big_conversation),      cmocka_unit_test(test_percent_format),
        cmocka_unit_test(test_integer_edges),         cmocka_unit_test(test_case_map_invalid_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
