/*
 * Publish -> deliver latency through a broker with rabbitmq-c, measured as
 * amqp-client's perf tool measures it with --rate: one producer publishing
 * at a fixed rate to a queue of its own, one consumer (basic.qos prefetch,
 * basic.ack per delivery), each on a connection and thread of its own; the
 * producer stamps CLOCK_MONOTONIC nanoseconds in the first 8 bytes of the
 * body, the consumer subtracts it from its own clock on receipt.
 *
 *   cc -O2 -o latency latency.c -lrabbitmq -lpthread
 *   ./latency [--host H] [--port P] [--rate MSGS_PER_S] [--duration S] [--size BYTES] [--prefetch N]
 *
 * Pacing: each publish waits (clock_nanosleep, TIMER_ABSTIME) for
 * start + n / rate, computed from the start so that late wake-ups do not
 * add up, with the kernel's timer resolution (tokio's is 1 ms).
 */
#define _GNU_SOURCE
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char *host = "127.0.0.1";
static int port = 5672;
static double rate = 1000;
static double duration = 10;
static size_t size = 32;
static int prefetch = 1000;
static char queue[128];
static atomic_int stop;
static atomic_ullong published;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void die_on_reply(amqp_rpc_reply_t reply, const char *what) {
    if (reply.reply_type == AMQP_RESPONSE_NORMAL)
        return;
    fprintf(stderr, "latency: %s failed (reply type %d)\n", what, reply.reply_type);
    exit(1);
}

static amqp_connection_state_t open_connection(void) {
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *socket = amqp_tcp_socket_new(conn);
    if (!socket || amqp_socket_open(socket, host, port) != AMQP_STATUS_OK) {
        fprintf(stderr, "latency: cannot connect to %s:%d\n", host, port);
        exit(1);
    }
    die_on_reply(amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest"),
                 "login");
    amqp_channel_open(conn, 1);
    die_on_reply(amqp_get_rpc_reply(conn), "channel.open");
    return conn;
}

static void *producer(void *arg) {
    (void)arg;
    amqp_connection_state_t conn = open_connection();
    char *body = malloc(size);
    memset(body, 'x', size);
    amqp_bytes_t bytes = {.len = size, .bytes = body};
    amqp_basic_properties_t properties = {._flags = 0};
    uint64_t start = now_ns();
    for (uint64_t n = 0; !atomic_load(&stop); n++) {
        uint64_t due = start + (uint64_t)((double)n * 1e9 / rate);
        struct timespec t = {.tv_sec = due / 1000000000u, .tv_nsec = due % 1000000000u};
        if (due > now_ns())
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
        uint64_t sent = now_ns();
        memcpy(body, &sent, sizeof sent);
        if (amqp_basic_publish(conn, 1, amqp_empty_bytes, amqp_cstring_bytes(queue), 0, 0,
                               &properties, bytes) != AMQP_STATUS_OK) {
            fprintf(stderr, "latency: publish failed\n");
            exit(1);
        }
        atomic_fetch_add(&published, 1);
    }
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    free(body);
    return NULL;
}

static int compare(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double percentile(const uint64_t *sorted, size_t n, double q) {
    if (n == 0)
        return 0;
    size_t rank = (size_t)(q * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)sorted[rank - 1] / 1000.0;
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--prefetch")) prefetch = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: latency [--host H] [--port P] [--rate N] [--duration S] "
                            "[--size BYTES] [--prefetch N]\n");
            return 2;
        }
    }
    if (size < 8 || rate <= 0) {
        fprintf(stderr, "latency: --size is at least 8 (the stamp), --rate above 0\n");
        return 2;
    }
    snprintf(queue, sizeof queue, "amqp-client.latency-c-%d", (int)getpid());

    amqp_connection_state_t conn = open_connection();
    amqp_queue_declare(conn, 1, amqp_cstring_bytes(queue), 0, 0, 0, 0, amqp_empty_table);
    die_on_reply(amqp_get_rpc_reply(conn), "queue.declare");
    amqp_basic_qos(conn, 1, 0, (uint16_t)prefetch, 0);
    die_on_reply(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    die_on_reply(amqp_get_rpc_reply(conn), "basic.consume");

    size_t capacity = (size_t)(rate * (duration + 5)) + 1024, count = 0;
    uint64_t *latencies = malloc(capacity * sizeof *latencies);
    pthread_t thread;
    pthread_create(&thread, NULL, producer, NULL);
    uint64_t started = now_ns();
    uint64_t end = started + (uint64_t)(duration * 1e9);
    struct timeval poll = {.tv_sec = 0, .tv_usec = 100000};
    while (now_ns() < end) {
        amqp_envelope_t envelope;
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t reply = amqp_consume_message(conn, &envelope, &poll, 0);
        if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
            reply.library_error == AMQP_STATUS_TIMEOUT)
            continue;
        die_on_reply(reply, "consume");
        uint64_t received = now_ns(), sent;
        if (envelope.message.body.len >= 8 && count < capacity) {
            memcpy(&sent, envelope.message.body.bytes, sizeof sent);
            latencies[count++] = received - sent;
        }
        amqp_basic_ack(conn, 1, envelope.delivery_tag, 0);
        amqp_destroy_envelope(&envelope);
    }
    double elapsed = (double)(now_ns() - started) / 1e9;
    atomic_store(&stop, 1);
    pthread_join(thread, NULL);

    qsort(latencies, count, sizeof *latencies, compare);
    printf("rabbitmq-c %s: rate %.0f msg/s, %zu B, prefetch %d, %.1f s\n", amqp_version(), rate,
           size, prefetch, elapsed);
    printf("  published %llu (%.0f msg/s), consumed %zu (%.0f msg/s)\n",
           (unsigned long long)atomic_load(&published), (double)atomic_load(&published) / elapsed,
           count, (double)count / elapsed);
    printf("  latency publish -> deliver (%zu samples): p50 %.0f us, p90 %.0f us, p99 %.0f us, "
           "p99.9 %.0f us, max %.0f us\n",
           count, percentile(latencies, count, 0.5), percentile(latencies, count, 0.9),
           percentile(latencies, count, 0.99), percentile(latencies, count, 0.999),
           percentile(latencies, count, 1.0));

    amqp_queue_delete(conn, 1, amqp_cstring_bytes(queue), 0, 0);
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    free(latencies);
    return 0;
}
