/* test_server_request.c - forge serve's request parser (src/server/srv_request.h): OpenAI's
 * defaults, every field's type and range check naming the field, the prompt forms of
 * /v1/completions, chat messages normalised for the template, stop and logit_bias limits, the
 * body checks made before cJSON (UTF-8, nesting depth, trailing bytes), the error body's
 * shape, and /tokenize and /detokenize bodies. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "server/srv_request.h"
#include "testutil.h"

static int parse(srv_kind k, const char *body, srv_request *r, srv_error *e)
{
    memset(e, 0, sizeof *e);
    return srv_request_parse(k, body, strlen(body), r, e);
}

/* body must be refused with 400 naming param (NULL: no param) */
static void refused(srv_kind k, const char *body, const char *param)
{
    srv_request r;
    srv_error e;
    if (parse(k, body, &r, &e) == 0) fail_msg("accepted: %s", body);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.type, "invalid_request_error");
    assert_string_equal(e.param, param ? param : "");
    if (param && !strstr(e.message, param)) fail_msg("'%s' does not name %s", e.message, param);
}

static void test_defaults(void **state)
{
    srv_request r;
    srv_error e;
    assert_int_equal(parse(SRV_COMPLETION, "{\"prompt\": \"hi\"}", &r, &e), 0);
    assert_int_equal(r.n_prompts, 1);
    assert_string_equal(r.prompts[0].text, "hi");
    assert_false(r.prompts[0].is_ids);
    assert_int_equal(r.max_tokens, -1);
    assert_true(r.temperature == 1.0f && r.top_p == 1.0f && r.repeat_penalty == 1.0f);
    assert_int_equal(r.n, 1);
    assert_false(r.stream || r.seed_set || r.logprobs);
    assert_null(r.model);
    srv_request_clear(&r);
}

static void test_all_fields(void **state)
{
    srv_request r;
    srv_error e;
    const char *b =
        "{\"model\":\"m\",\"prompt\":\"x\",\"max_tokens\":16,\"temperature\":0.5,\"top_p\":0.9,"
        "\"n\":3,\"stop\":[\"a\",\"bc\"],\"seed\":-1,\"logprobs\":2,\"logit_bias\":{\"5\":-100,"
        "\"7\":1.5},\"stream\":true,\"stream_options\":{\"include_usage\":true},\"user\":\"u\","
        "\"top_k\":40,\"min_p\":0.1,\"repeat_penalty\":1.2,\"presence_penalty\":0.5,"
        "\"frequency_penalty\":-1,\"ignore_eos\":true,\"unknown\":{\"x\":[1]}}";
    assert_int_equal(parse(SRV_COMPLETION, b, &r, &e), 0);
    assert_string_equal(r.model, "m");
    assert_int_equal(r.max_tokens, 16);
    assert_true(fabsf(r.temperature - 0.5f) < 1e-6 && fabsf(r.top_p - 0.9f) < 1e-6);
    assert_int_equal(r.n, 3);
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[1], "bc");
    assert_true(r.seed_set);
    assert_true(r.seed == UINT64_MAX); /* -1 wraps, as a 64-bit seed */
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 2);
    assert_int_equal(r.n_logit_bias, 2);
    assert_int_equal(r.logit_bias[0].id, 5);
    assert_true(isinf(r.logit_bias[0].bias) && r.logit_bias[0].bias < 0); /* -100 bans */
    assert_true(r.logit_bias[1].bias == 1.5f);
    assert_true(r.stream && r.include_usage);
    assert_string_equal(r.user, "u");
    assert_int_equal(r.top_k, 40);
    assert_true(fabsf(r.min_p - 0.1f) < 1e-6 && fabsf(r.repeat_penalty - 1.2f) < 1e-6);
    assert_true(r.presence_penalty == 0.5f && r.frequency_penalty == -1.0f);
    assert_true(r.ignore_eos);
    srv_request_clear(&r);
    /* null means "not given", as the official clients send it */
    assert_int_equal(
        parse(SRV_COMPLETION, "{\"prompt\":\"x\",\"max_tokens\":null,\"stop\":null}", &r, &e), 0);
    assert_int_equal(r.max_tokens, -1);
    srv_request_clear(&r);
    /* max_completion_tokens, the newer name, wins */
    assert_int_equal(parse(SRV_CHAT,
                           "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":5,"
                           "\"max_completion_tokens\":9}",
                           &r, &e),
                     0);
    assert_int_equal(r.max_tokens, 9);
    srv_request_clear(&r);
}

static void test_prompt_forms(void **state)
{
    srv_request r;
    srv_error e;
    assert_int_equal(parse(SRV_COMPLETION, "{\"prompt\":[1,2,3]}", &r, &e), 0);
    assert_int_equal(r.n_prompts, 1);
    assert_true(r.prompts[0].is_ids);
    assert_int_equal(r.prompts[0].n_ids, 3);
    assert_int_equal(r.prompts[0].ids[2], 3);
    srv_request_clear(&r);
    assert_int_equal(parse(SRV_COMPLETION, "{\"prompt\":[\"a\",[4,5],\"b\"]}", &r, &e), 0);
    assert_int_equal(r.n_prompts, 3);
    assert_string_equal(r.prompts[0].text, "a");
    assert_true(r.prompts[1].is_ids && r.prompts[1].n_ids == 2);
    assert_string_equal(r.prompts[2].text, "b");
    srv_request_clear(&r);
    refused(SRV_COMPLETION, "{\"prompt\":[]}", "prompt");
    refused(SRV_COMPLETION, "{\"prompt\":[1,-2]}", "prompt");
    refused(SRV_COMPLETION, "{\"prompt\":[1,2.5]}", "prompt");
    refused(SRV_COMPLETION, "{\"prompt\":[\"a\",[]]}", "prompt");
    refused(SRV_COMPLETION, "{\"prompt\":{}}", "prompt");
    refused(SRV_COMPLETION, "{\"max_tokens\":3}", "prompt");
    /* n x prompts is capped */
    refused(SRV_COMPLETION, "{\"prompt\":[\"a\",\"b\",\"c\",\"d\",\"e\"],\"n\":16}", "n");
}

static void test_messages(void **state)
{
    srv_request r;
    srv_error e;
    const char *b = "{\"messages\":[{\"role\":\"developer\",\"content\":\"sys\"},"
                    "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                    "{\"type\":\"text\",\"text\":\"b\"}],\"name\":\"x\"},"
                    "{\"role\":\"assistant\",\"content\":null}]}";
    assert_int_equal(parse(SRV_CHAT, b, &r, &e), 0);
    cJSON *m = cJSON_Parse(r.messages_json);
    assert_int_equal(cJSON_GetArraySize(m), 3);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(m, 0), "role")->valuestring,
                        "system");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(m, 1), "content")->valuestring,
                        "ab");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(m, 2), "content")->valuestring, "");
    cJSON_Delete(m);
    srv_request_clear(&r);
    refused(SRV_CHAT, "{}", "messages");
    refused(SRV_CHAT, "{\"messages\":[]}", "messages");
    refused(SRV_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "messages");
    refused(SRV_CHAT, "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", "messages");
    refused(SRV_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":7}]}", "messages");
    refused(SRV_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
            "messages");
    refused(SRV_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}",
            "top_logprobs");
    refused(SRV_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":3}",
            "logprobs");
}

static void test_field_checks(void **state)
{
    static const struct {
        const char *body, *param;
    } cases[] = {
        {"{\"prompt\":\"x\",\"temperature\":\"hot\"}", "temperature"},
        {"{\"prompt\":\"x\",\"temperature\":2.5}", "temperature"},
        {"{\"prompt\":\"x\",\"temperature\":-0.1}", "temperature"},
        {"{\"prompt\":\"x\",\"top_p\":1.01}", "top_p"},
        {"{\"prompt\":\"x\",\"min_p\":-1}", "min_p"},
        {"{\"prompt\":\"x\",\"presence_penalty\":2.5}", "presence_penalty"},
        {"{\"prompt\":\"x\",\"frequency_penalty\":-3}", "frequency_penalty"},
        {"{\"prompt\":\"x\",\"repeat_penalty\":0}", "repeat_penalty"},
        {"{\"prompt\":\"x\",\"max_tokens\":0}", "max_tokens"},
        {"{\"prompt\":\"x\",\"max_tokens\":1e300}", "max_tokens"},
        {"{\"prompt\":\"x\",\"max_tokens\":3.5}", "max_tokens"},
        {"{\"prompt\":\"x\",\"max_tokens\":true}", "max_tokens"},
        {"{\"prompt\":\"x\",\"n\":17}", "n"},
        {"{\"prompt\":\"x\",\"top_k\":-2}", "top_k"},
        {"{\"prompt\":\"x\",\"seed\":1.5}", "seed"},
        {"{\"prompt\":\"x\",\"seed\":1e30}", "seed"},
        {"{\"prompt\":\"x\",\"stream\":1}", "stream"},
        {"{\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}", "stream_options"},
        {"{\"prompt\":\"x\",\"stream\":true,\"stream_options\":{\"include_usage\":1}}",
         "stream_options.include_usage"},
        {"{\"prompt\":\"x\",\"stop\":[\"a\",2]}", "stop"},
        {"{\"prompt\":\"x\",\"stop\":\"\"}", "stop"},
        {"{\"prompt\":\"x\",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\","
         "\"11\",\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}",
         "stop"},
        {"{\"prompt\":\"x\",\"logit_bias\":[1]}", "logit_bias"},
        {"{\"prompt\":\"x\",\"logit_bias\":{\"-1\":1}}", "logit_bias"},
        {"{\"prompt\":\"x\",\"logit_bias\":{\"1x\":1}}", "logit_bias"},
        {"{\"prompt\":\"x\",\"logit_bias\":{\"1\":101}}", "logit_bias"},
        {"{\"prompt\":\"x\",\"logit_bias\":{\"1\":\"a\"}}", "logit_bias"},
        {"{\"prompt\":\"x\",\"logprobs\":21}", "logprobs"},
        {"{\"prompt\":\"x\",\"model\":5}", "model"},
        {"{\"prompt\":\"x\",\"user\":[]}", "user"},
        {"{\"prompt\":\"x\",\"ignore_eos\":\"yes\"}", "ignore_eos"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        refused(SRV_COMPLETION, cases[i].body, cases[i].param);
    /* echo / best_of / suffix: refused rather than silently ignored */
    srv_request r;
    srv_error e;
    assert_int_not_equal(parse(SRV_COMPLETION, "{\"prompt\":\"x\",\"echo\":true}", &r, &e), 0);
    assert_string_equal(e.param, "echo");
    assert_int_not_equal(parse(SRV_COMPLETION, "{\"prompt\":\"x\",\"best_of\":3}", &r, &e), 0);
    assert_string_equal(e.param, "best_of");
}

static void test_body_checks(void **state)
{
    refused(SRV_COMPLETION, "", NULL);
    refused(SRV_COMPLETION, "{\"prompt\": ", NULL);
    refused(SRV_COMPLETION, "[]", NULL);
    refused(SRV_COMPLETION, "\"x\"", NULL);
    refused(SRV_COMPLETION, "{\"prompt\":\"x\"} {}", NULL);
    refused(SRV_COMPLETION, "{\"prompt\":\"\xc3\x28\"}", NULL);     /* invalid UTF-8 */
    refused(SRV_COMPLETION, "{\"prompt\":\"\xed\xa0\x80\"}", NULL); /* a raw surrogate */
    refused(SRV_COMPLETION, "{\"prompt\":\"\xc0\xaf\"}", NULL);     /* overlong */
    char deep[300];
    int n = 0;
    n += snprintf(deep + n, sizeof deep - (size_t)n, "{\"prompt\":");
    for (int i = 0; i < 40; i++)
        deep[n++] = '[';
    for (int i = 0; i < 40; i++)
        deep[n++] = ']';
    snprintf(deep + n, sizeof deep - (size_t)n, "}");
    refused(SRV_COMPLETION, deep, NULL);
    /* brackets inside strings do not count as depth */
    srv_request r;
    srv_error e;
    assert_int_equal(
        parse(SRV_COMPLETION, "{\"prompt\":\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"}", &r, &e), 0);
    srv_request_clear(&r);
    /* the body need not be NUL-terminated: only len bytes are read */
    const char buf[] = {'{', '"', 'p', 'r', 'o', 'm', 'p', 't', '"', ':', '"', 'a', '"', '}', 'X'};
    assert_int_equal(srv_request_parse(SRV_COMPLETION, buf, sizeof buf - 1, &r, &e), 0);
    srv_request_clear(&r);
    size_t bad = 0;
    assert_true(srv_utf8_valid("h\xc3\xa9\xf0\x9f\x98\x80", 7, &bad));
    assert_false(srv_utf8_valid("ab\xe2\x82", 4, &bad));
    assert_int_equal(bad, 2);
    assert_false(srv_utf8_valid("\xf4\x90\x80\x80", 4, &bad)); /* > U+10FFFF */
}

static void test_error_json(void **state)
{
    srv_error e;
    srv_fail(&e, 401, "authentication_error", NULL, "invalid_api_key", "bad key \"%s\"", "k");
    char *s = srv_error_json(&e);
    cJSON *j = cJSON_Parse(s);
    cJSON *o = cJSON_GetObjectItem(j, "error");
    assert_string_equal(cJSON_GetObjectItem(o, "message")->valuestring, "bad key \"k\"");
    assert_string_equal(cJSON_GetObjectItem(o, "type")->valuestring, "authentication_error");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(o, "param")));
    assert_string_equal(cJSON_GetObjectItem(o, "code")->valuestring, "invalid_api_key");
    cJSON_Delete(j);
    free(s);
}

static void test_tokenize_bodies(void **state)
{
    char *text = NULL;
    size_t len = 0;
    bool add = true;
    int32_t *ids = NULL, n = 0;
    srv_error e;
    assert_int_equal(srv_tokenize_parse("{\"content\":\"hi\"}", 16, &text, &len, &add, &e), 0);
    assert_string_equal(text, "hi");
    assert_false(add);
    free(text);
    const char *b = "{\"prompt\":\"yo\",\"add_special\":true}";
    assert_int_equal(srv_tokenize_parse(b, strlen(b), &text, &len, &add, &e), 0);
    assert_true(add && len == 2);
    free(text);
    b = "{\"content\":5}";
    assert_int_not_equal(srv_tokenize_parse(b, strlen(b), &text, &len, &add, &e), 0);
    assert_string_equal(e.param, "content");
    b = "{\"tokens\":[1,2,3]}";
    assert_int_equal(srv_detokenize_parse(b, strlen(b), &ids, &n, &e), 0);
    assert_int_equal(n, 3);
    free(ids);
    b = "{\"tokens\":[1,\"a\"]}";
    assert_int_not_equal(srv_detokenize_parse(b, strlen(b), &ids, &n, &e), 0);
    assert_string_equal(e.param, "tokens");
    b = "{}";
    assert_int_not_equal(srv_detokenize_parse(b, strlen(b), &ids, &n, &e), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),     cmocka_unit_test(test_all_fields),
        cmocka_unit_test(test_prompt_forms), cmocka_unit_test(test_messages),
        cmocka_unit_test(test_field_checks), cmocka_unit_test(test_body_checks),
        cmocka_unit_test(test_error_json),   cmocka_unit_test(test_tokenize_bodies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
