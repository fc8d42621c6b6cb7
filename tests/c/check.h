/* What the C test drivers share: failure counting, status checks, a tiny deterministic RNG, bf16 bits. */
#ifndef GPTOSS_TEST_CHECK_H
#define GPTOSS_TEST_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "gptoss.h"

#ifndef TEST_RNG_SEED
#define TEST_RNG_SEED 12345u
#endif

static int failures;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            failures++;                                                         \
            fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
        }                                                                       \
    } while (0)

#define EXPECT_STATUS(call, expected)                                                                 \
    do {                                                                                              \
        int status_ = (call);                                                                         \
        CHECK(status_ == (expected), "%s returned %d (%s), expected %d", #call, status_,              \
              gptoss_status_string(status_), (expected));                                            \
    } while (0)

/* xorshift32: the same inputs on every run and machine. */
static uint32_t rng_state = TEST_RNG_SEED;
static uint32_t next_random(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static float bf16_bits_to_f32(gptoss_bf16 h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#endif
