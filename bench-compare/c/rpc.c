/*
 * RPC round trip with rabbitmq-c, measured as amqp-client's perf tool
 * measures it with --rpc: sequential passive queue.declare calls on one
 * channel, after warm-up calls, each timed with CLOCK_MONOTONIC; prints
 * p50, p90 and p99 and the client CPU per round trip.
 *
 *   cc -O2 -o rpc rpc.c -lrabbitmq
 *   ./rpc [--host H] [--port P] [--calls N] [--warmup N] [--queue NAME]
 */
#define _GNU_SOURCE
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void die_on_reply(amqp_rpc_reply_t reply, const char *what) {
    if (reply.reply_type == AMQP_RESPONSE_NORMAL)
        return;
    fprintf(stderr, "rpc: %s failed (reply type %d)\n", what, reply.reply_type);
    exit(1);
}

static int by_value(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double cpu_seconds(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec +
           usage.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *queue = "amqp-client.perf";
    int port = 5672;
    long calls = 20000, warmup = 1000;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--calls")) calls = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--queue")) queue = argv[i + 1];
        else {
            fprintf(stderr, "rpc: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *socket = amqp_tcp_socket_new(conn);
    if (!socket || amqp_socket_open(socket, host, port) != AMQP_STATUS_OK) {
        fprintf(stderr, "rpc: cannot connect to %s:%d\n", host, port);
        return 1;
    }
    die_on_reply(amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest"),
                 "login");
    amqp_channel_open(conn, 1);
    die_on_reply(amqp_get_rpc_reply(conn), "channel.open");
    amqp_bytes_t name = amqp_cstring_bytes(queue);
    amqp_queue_declare(conn, 1, name, 0, 0, 0, 0, amqp_empty_table);
    die_on_reply(amqp_get_rpc_reply(conn), "queue.declare");

    uint64_t *took = malloc(sizeof *took * (size_t)calls);
    double cpu_start = 0;
    for (long i = -warmup; i < calls; i++) {
        if (i == 0) cpu_start = cpu_seconds();
        uint64_t start = now_ns();
        amqp_queue_declare(conn, 1, name, 1, 0, 0, 0, amqp_empty_table);
        die_on_reply(amqp_get_rpc_reply(conn), "passive queue.declare");
        if (i >= 0) took[i] = now_ns() - start;
    }
    double cpu = cpu_seconds() - cpu_start;
    qsort(took, (size_t)calls, sizeof *took, by_value);
    printf("rabbitmq-c rpc: %ld round trips: p50 %.1f µs, p90 %.1f µs, p99 %.1f µs; %.1f µs CPU per round trip\n",
           calls, took[calls / 2] / 1e3, took[calls * 9 / 10] / 1e3, took[calls * 99 / 100] / 1e3,
           cpu / (double)calls * 1e6);
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    free(took);
    return 0;
}
