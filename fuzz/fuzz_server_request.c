/* fuzz_server_request.c - libFuzzer target for forge serve's request parser (src/server/
 * srv_request.c): any bytes as the body of /v1/completions, /v1/chat/completions, /tokenize or
 * /detokenize. Checks: no crash, hang or leak (ASan); a refusal is a 400 (or 503 for memory)
 * with a message, and its OpenAI error body is valid JSON; an accepted request respects every
 * limit the parser promises (counts, ranges, normalised messages that parse as JSON).
 *
 * Input: byte 0 selects the endpoint, the rest is the body. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "server/srv_request.h"

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "fuzz_server_request: check failed: %s (line %d)\n", #c, __LINE__);    \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void check_error(const srv_error *e)
{
    CHECK(e->status == 400 || e->status == 503);
    CHECK(e->message[0]);
    char *js = srv_error_json(e);
    CHECK(js);
    cJSON *j = cJSON_Parse(js);
    CHECK(cJSON_IsObject(cJSON_GetObjectItem(j, "error")));
    cJSON_Delete(j);
    free(js);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    srv_error e;
    memset(&e, 0, sizeof e);
    switch (data[0] & 3) {
    case 0:
    case 1: {
        srv_kind kind = (data[0] & 3) ? SRV_CHAT : SRV_COMPLETION;
        srv_request r;
        if (srv_request_parse(kind, body, len, &r, &e)) {
            check_error(&e);
            break;
        }
        CHECK(r.n >= 1 && r.n <= SRV_MAX_N);
        CHECK(r.max_tokens == -1 || r.max_tokens >= 1);
        CHECK(r.temperature >= 0 && r.temperature <= 2 && r.top_p >= 0 && r.top_p <= 1);
        CHECK(r.top_logprobs >= 0 && r.top_logprobs <= SRV_MAX_TOP_LOGPROBS);
        CHECK(r.n_stop >= 0 && r.n_stop <= SRV_MAX_STOP);
        for (int32_t i = 0; i < r.n_stop; i++)
            CHECK(r.stop[i][0] && strlen(r.stop[i]) <= SRV_MAX_STOP_LEN);
        for (int32_t i = 0; i < r.n_logit_bias; i++)
            CHECK(r.logit_bias[i].id >= 0 && !isnan(r.logit_bias[i].bias));
        if (kind == SRV_CHAT) {
            cJSON *m = cJSON_Parse(r.messages_json);
            CHECK(cJSON_IsArray(m) && cJSON_GetArraySize(m) > 0);
            cJSON_Delete(m);
        } else {
            CHECK(r.n_prompts >= 1 && r.n_prompts * r.n <= SRV_MAX_CHOICES);
            for (int32_t i = 0; i < r.n_prompts; i++) {
                const srv_prompt *p = &r.prompts[i];
                CHECK(p->is_ids ? p->n_ids >= 1 || i == 0 : p->text != NULL);
                for (int32_t k = 0; p->is_ids && k < p->n_ids; k++)
                    CHECK(p->ids[k] >= 0);
            }
        }
        srv_request_clear(&r);
        break;
    }
    case 2: {
        char *text = NULL;
        size_t tl = 0;
        bool add = false;
        if (srv_tokenize_parse(body, len, &text, &tl, &add, &e))
            check_error(&e);
        else
            CHECK(text && strlen(text) == tl);
        free(text);
        break;
    }
    default: {
        int32_t *ids = NULL, n = 0;
        if (srv_detokenize_parse(body, len, &ids, &n, &e))
            check_error(&e);
        else
            for (int32_t i = 0; i < n; i++)
                CHECK(ids[i] >= 0);
        free(ids);
        break;
    }
    }
    return 0;
}
