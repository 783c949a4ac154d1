/* fuzz_template.c - libFuzzer target for the chat-template engine: the input is a template
 * (optionally followed by a NUL byte and a messages JSON text); it is parsed and, when it
 * parses, rendered with small limits. Must never crash, leak, or run unbounded: scripts/fuzz.sh
 * runs it with -timeout=2, and the render's own wall-clock budget (500 ms here) must end every
 * input before that. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"

static const char default_messages[] =
    "[{\"role\": \"system\", \"content\": \"Be brief.\"},"
    " {\"role\": \"user\", \"content\": \"Hi \\u00e9 <b>\"},"
    " {\"role\": \"assistant\", \"content\": \"Hello\", \"tool_calls\": [{\"id\": \"1\","
    " \"function\": {\"name\": \"f\", \"arguments\": {\"a\": [1, 2.5, null, true]}}}]},"
    " {\"role\": \"user\", \"content\": \"Bye\"}]";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *src = (const char *)data;
    size_t src_len = size;
    char *messages = NULL;
    const uint8_t *nul = memchr(data, 0, size);
    if (nul) {
        src_len = (size_t)(nul - data);
        size_t mlen = size - src_len - 1;
        messages = malloc(mlen + 1);
        if (!messages) return 0;
        memcpy(messages, nul + 1, mlen);
        messages[mlen] = 0;
    }
    forge_template *t = NULL;
    forge_err err = {0};
    int line = 0;
    if (forge_template_parse(src, src_len, &t, &line, &err) == FORGE_OK) {
        forge_template_vars v = {0};
        v.messages_json = messages ? messages : default_messages;
        v.add_generation_prompt = size & 1;
        v.bos_token = "<s>";
        v.eos_token = (size & 2) ? "</s>" : NULL;
        v.extra_json = "{\"enable_thinking\": false, \"n\": 3}";
        v.now = 1768435200;
        v.max_output = 1 << 20;
        v.max_steps = 200000;
        v.max_depth = 32;
        v.max_memory = 64u << 20;
        v.max_time_ms = 500;
        v.name = "fuzz input";
        char *out = NULL;
        size_t n = 0;
        forge_template_error d;
        if (forge_template_render(t, &v, &out, &n, &d, &err) == FORGE_OK && n != strlen(out))
            ; /* output may contain NULs from \x00 escapes: fine */
        free(out);
        forge_template_free(t);
    }
    free(messages);
    return 0;
}
