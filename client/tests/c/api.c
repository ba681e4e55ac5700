/* The tally C API as a product uses it, step by step, against a real tallyd.
 * Built and driven by tests/tests/c_api.rs; each step prints "ok: ..." or
 * "FAIL: ..." (and exits 1). "wait: ..." lines ask the driver to act on the server
 * and answer with a line on stdin.
 *
 *   api vendor VERSION      servers from TALLY_SERVER; vendor_key.h gives VENDOR_KEY
 *                           (the server's vendor) and OTHER_KEY (another vendor)
 *   api demo SERVER         a demo server with a checkout rate limit of 1/s
 *   api faults SERVERS      a demo server behind a dead first entry: failover, this
 *                           process stopped past the idle timeout, offline borrow
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tally.h>

#include "vendor_key.h"

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            printf("FAIL: line %d: ", __LINE__);                                \
            printf(__VA_ARGS__);                                                \
            printf(" (last error %d: %s)\n", tally_last_error_code(),          \
                   tally_last_error());                                         \
            fflush(stdout);                                                     \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

static void ok(const char *step) {
    printf("ok: %s\n", step);
    fflush(stdout);
}

/* Asks the driver to do something and waits for its answer. */
static void wait_for_driver(const char *what) {
    char line[256];
    printf("wait: %s\n", what);
    fflush(stdout);
    CHECK(fgets(line, sizeof line, stdin) != NULL, "no answer from the driver");
}

static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Polls `flag` until it equals `want`, for at most 30 s. */
static int wait_flag(atomic_int *flag, int want) {
    for (int i = 0; i < 300; i++) {
        if (atomic_load(flag) == want) return 1;
        pause_ms(100);
    }
    return 0;
}

static void expect_denial(int denied_code, const char *name) {
    CHECK(tally_last_error_code() == TALLY_ERR_DENIED, "%s: not a denial", name);
    CHECK(tally_last_denial_code() == denied_code, "%s: denial %d", name,
          tally_last_denial_code());
    CHECK(strcmp(tally_denial_name(denied_code), name) == 0, "name %s",
          tally_denial_name(denied_code));
}

/* ---- queue and status callbacks (run on other threads) ---- */

static atomic_int queue_position;
static void on_queue(uint32_t position, void *user) {
    (void)user;
    atomic_store(&queue_position, (int)position);
}

static atomic_int last_status = -1;
static atomic_int status_calls;
static void on_status(int status, void *user) {
    atomic_store((atomic_int *)user, status);
    atomic_fetch_add(&status_calls, 1);
}

struct waiter {
    tally_client *client;
    tally_lease *lease;
    int error;
};

static void *wait_in_queue(void *arg) {
    struct waiter *w = arg;
    w->lease = tally_checkout_ex(w->client, "solver", 1, "2027.1", 0, 60, on_queue, NULL);
    w->error = tally_last_error_code();
    return NULL;
}

static void *checkout_loop(void *arg) {
    tally_client *client = arg;
    for (int i = 0; i < 5; i++) {
        tally_lease *l = tally_checkout(client, "viewer", 1, NULL);
        if (l == NULL) return (void *)1;
        if (tally_last_error_code() != TALLY_OK) return (void *)2;
        if (tally_checkin(l) != 0) return (void *)3;
    }
    return NULL;
}

static int vendor(const char *expected_version) {
    char buf[64];
    time_t now = time(NULL);

    CHECK(strcmp(tally_version(), expected_version) == 0, "version %s", tally_version());
    ok("tally_version");

    /* Trust only from the key compiled in: a wrong or malformed key is refused. */
    CHECK(tally_connect_key(NULL, "not a key") == NULL, "garbage key accepted");
    CHECK(tally_last_error_code() == TALLY_ERR_USAGE, "garbage key code");
    CHECK(tally_connect_key(NULL, OTHER_KEY) == NULL, "another vendor's key accepted");
    CHECK(tally_last_error_code() == TALLY_ERR_UNTRUSTED, "other key code");
    ok("a server not signed for by the embedded key is untrusted");

    /* NULL servers: TALLY_SERVER. Success clears the error left by the failure. */
    tally_client *client = tally_connect_key(NULL, VENDOR_KEY);
    CHECK(client != NULL, "connect with the embedded key");
    CHECK(tally_last_error_code() == TALLY_OK && tally_last_error()[0] == 0, "not cleared");
    ok("connected through TALLY_SERVER with the embedded key; error cleared");

    CHECK(tally_checkout(client, "solver", 0, NULL) == NULL, "count 0 gave a seat");
    CHECK(tally_last_error_code() == TALLY_ERR_USAGE, "count 0 code");
    ok("count 0 is a usage error");

    tally_denial d;
    CHECK(tally_checkout(client, "mesher", 1, NULL) == NULL, "mesher granted");
    expect_denial(TALLY_DENIED_NOT_LICENSED, "not_licensed");
    CHECK(tally_last_denial(&d) == 0 && strcmp(d.feature, "mesher") == 0, "feature %s",
          d.feature);
    ok("not_licensed with the feature");

    CHECK(tally_checkout(client, "solver", 1, "2099.1") == NULL, "2099.1 granted");
    expect_denial(TALLY_DENIED_VERSION_ABOVE_CEILING, "version_above_ceiling");
    CHECK(tally_last_denial(&d) == 0 && strcmp(d.detail, "2027.1") == 0, "ceiling %s",
          d.detail);
    ok("version_above_ceiling with the ceiling");

    const int64_t built_late = 1827619200; /* 2027-12-01 */
    CHECK(tally_checkout_ex(client, "solver", 1, "2027.1", built_late, 0, NULL, NULL) == NULL,
          "a build after maintenance granted");
    expect_denial(TALLY_DENIED_MAINTENANCE_EXPIRED, "maintenance_expired");
    CHECK(tally_last_denial(&d) == 0 && d.build_date == built_late && d.date > 0 &&
              d.date < built_late,
          "dates %lld %lld", (long long)d.build_date, (long long)d.date);
    ok("maintenance_expired with the build date and the maintenance end");

    CHECK(tally_checkout(client, "oldtool", 1, NULL) == NULL, "expired granted");
    expect_denial(TALLY_DENIED_EXPIRED, "expired");
    CHECK(tally_last_denial(&d) == 0 && d.date > 0 && d.date < now, "expired %lld",
          (long long)d.date);
    ok("expired with the date");

    const int64_t built = 1798761600; /* 2027-01-01 */
    tally_lease *lease = tally_checkout_ex(client, "solver", 1, "2027.1", built, 0, NULL, NULL);
    CHECK(lease != NULL, "solver checkout");
    CHECK(tally_last_error_code() == TALLY_OK && tally_last_denial_code() == TALLY_DENIED_NONE,
          "error not cleared by the checkout");
    CHECK(tally_lease_status(lease) == TALLY_STATUS_ACTIVE, "status");
    CHECK(tally_lease_id(lease) != 0, "lease id");
    printf("lease L%016llx\n", (unsigned long long)tally_lease_id(lease));
    ok("checked out with version and build date");

    tally_terms info;
    CHECK(tally_feature_terms(client, "solver", &info) == 0, "solver info");
    CHECK(info.expires == 0 && info.evaluation == 0 && info.maintenance_until > built,
          "solver info %lld %d %lld", (long long)info.expires, info.evaluation,
          (long long)info.maintenance_until);
    CHECK(tally_feature_terms(client, "trial", &info) == 0, "trial info");
    CHECK(info.evaluation == 1 && info.expires > now, "trial info %lld %d",
          (long long)info.expires, info.evaluation);
    CHECK(tally_feature_terms(client, "mesher", &info) == -1, "mesher info");
    expect_denial(TALLY_DENIED_NOT_LICENSED, "not_licensed");
    ok("feature info: expiry, evaluation, maintenance");

    CHECK(tally_attribute(client, "solver", "edition", buf, sizeof buf) == 3, "edition");
    CHECK(strcmp(buf, "pro") == 0, "edition %s", buf);
    CHECK(tally_attribute(client, "solver", "max_cores", buf, sizeof buf) == 2, "cores");
    CHECK(atoi(buf) == 16, "max_cores %s", buf);
    CHECK(tally_attribute(client, "solver", "edition", NULL, 0) == 3, "sizing");
    CHECK(tally_attribute(client, "solver", "edition", buf, 2) == 3 && strcmp(buf, "p") == 0,
          "cut %s", buf);
    CHECK(tally_attribute(client, "solver", "colour", buf, sizeof buf) == -1, "colour");
    CHECK(tally_last_error_code() == TALLY_ERR_USAGE, "missing attribute code");
    ok("attributes edition and max_cores");

    /* A service checking out for its users: its own identity. */
    tally_config *config = tally_config_new(NULL);
    CHECK(config != NULL, "config");
    CHECK(tally_config_trust_key(config, VENDOR_KEY) == 0, "trust key");
    CHECK(tally_config_identity(config, "", NULL, NULL) == -1, "empty user accepted");
    CHECK(tally_config_identity(config, "svc-render", "farm1", "renderd") == 0, "identity");
    CHECK(tally_config_timeouts(config, 3000, 5000) == 0, "timeouts");
    tally_client *service = tally_connect_config(config);
    tally_config_free(config);
    CHECK(service != NULL, "service connect");
    CHECK(tally_checkout(service, "solver", 1, "2027.1") == NULL, "second solver seat");
    expect_denial(TALLY_DENIED_ALL_SEATS_IN_USE, "all_seats_in_use");
    CHECK(tally_last_denial(&d) == 0 && d.total == 1 && d.in_use == 1 && d.requested == 1,
          "seats %u %u %u", d.total, d.in_use, d.requested);
    ok("all_seats_in_use with total, in use and requested");

    /* Waiting in the queue, told its place. */
    struct waiter w = {service, NULL, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, wait_in_queue, &w) == 0, "thread");
    CHECK(wait_flag(&queue_position, 1), "never told its place in the queue");
    ok("queued at position 1");
    CHECK(tally_checkin(lease) == 0, "checkin");
    pthread_join(t, NULL);
    CHECK(w.lease != NULL, "the queued checkout failed: %d", w.error);
    CHECK(w.error == TALLY_OK, "queued checkout error %d", w.error);
    ok("granted from the queue when the seat came free");
    wait_for_driver("held-by-service");

    /* A status callback hears the seat taken away. */
    CHECK(tally_lease_on_change(w.lease, on_status, &last_status) == 0, "callback");
    char what[64];
    snprintf(what, sizeof what, "remove L%016llx", (unsigned long long)tally_lease_id(w.lease));
    wait_for_driver(what);
    CHECK(wait_flag(&last_status, TALLY_STATUS_LOST), "callback never heard LOST");
    CHECK(tally_lease_status(w.lease) == TALLY_STATUS_LOST, "status not LOST");
    CHECK(tally_last_error_code() == TALLY_OK, "a lost lease set an error");
    char reason[128];
    CHECK(tally_lease_reason(w.lease, reason, sizeof reason) > 0, "no reason");
    CHECK(strstr(reason, "removed") != NULL, "reason %s", reason);
    tally_lease_free(w.lease);
    ok("status callback: lost, with the reason");

    /* Borrow and return. */
    int64_t until = 0;
    CHECK(tally_borrow(client, "solver", 1, "2027.1", 3600, &until) == 0, "borrow");
    CHECK(until > now + 3000 && until < now + 7200, "until %lld", (long long)until);
    CHECK(tally_return(client, "solver") == 1, "return");
    CHECK(tally_borrow(client, "viewer", 1, NULL, 3600, &until) == -1, "viewer borrowed");
    expect_denial(TALLY_DENIED_BORROW_NOT_ALLOWED, "borrow_not_allowed");
    ok("borrow and return");

    /* One client, several threads at once. */
    pthread_t threads[4];
    for (int i = 0; i < 4; i++)
        CHECK(pthread_create(&threads[i], NULL, checkout_loop, client) == 0, "thread");
    for (int i = 0; i < 4; i++) {
        void *result;
        pthread_join(threads[i], &result);
        CHECK(result == NULL, "thread %d failed at %ld", i, (long)(intptr_t)result);
    }
    ok("four threads share one client");

    /* A lease outliving its client reports LOST, and its callback hears it. */
    atomic_int orphan_status = -1;
    tally_lease *orphan = tally_checkout(service, "viewer", 1, NULL);
    CHECK(orphan != NULL, "viewer");
    CHECK(tally_lease_on_change(orphan, on_status, &orphan_status) == 0, "callback");
    tally_client_free(service);
    CHECK(tally_lease_status(orphan) == TALLY_STATUS_LOST, "orphan status %d",
          tally_lease_status(orphan));
    CHECK(wait_flag(&orphan_status, TALLY_STATUS_LOST), "orphan callback");
    tally_lease_free(orphan);
    ok("a lease after tally_client_free is lost");

    tally_client_free(client);
    printf("done\n");
    return 0;
}

static int demo(const char *server) {
    tally_client *client = tally_connect_demo(server);
    CHECK(client != NULL, "connect");
    /* A rate limit of 1/s (burst 2): a quick series of checkouts is refused as such,
     * not as "all seats in use" or "unavailable". */
    int limited = 0;
    tally_lease *held[20] = {0};
    for (int i = 0; i < 20 && !limited; i++) {
        held[i] = tally_checkout(client, "viewer", 1, NULL);
        if (held[i] == NULL) {
            expect_denial(TALLY_DENIED_RATE_LIMITED, "rate_limited");
            tally_denial d;
            CHECK(tally_last_denial(&d) == 0 && d.retry_after_ms > 0, "retry after %u",
                  d.retry_after_ms);
            limited = 1;
        }
    }
    CHECK(limited, "never rate limited");
    for (int i = 0; i < 20; i++) tally_lease_free(held[i]);
    ok("rate_limited has its own code");

    wait_for_driver("restart");
    /* The server was restarted a moment ago: the first checkout still succeeds. The
     * rate limit may refuse it; then it is tried again after the wait it names. */
    tally_lease *lease = NULL;
    for (int i = 0; i < 10 && lease == NULL; i++) {
        lease = tally_checkout(client, "viewer", 1, NULL);
        if (lease == NULL) {
            CHECK(tally_last_denial_code() == TALLY_DENIED_RATE_LIMITED, "after restart");
            tally_denial d;
            tally_last_denial(&d);
            pause_ms(d.retry_after_ms + 10);
        }
    }
    CHECK(lease != NULL, "no seat after the restart");
    CHECK(tally_lease_status(lease) == TALLY_STATUS_ACTIVE, "status");
    tally_checkin(lease);
    ok("the first checkout after a restart succeeds");
    tally_client_free(client);
    printf("done\n");
    return 0;
}

/* Network faults as a product meets them: a dead first server in the list, this
 * process stopped (a laptop lid) for longer than the server's idle timeout, and a
 * borrowed seat used with the server gone. */
static int faults(const char *servers) {
    tally_client *client = tally_connect_demo(servers);
    CHECK(client != NULL, "connect past a dead first server");
    tally_lease *lease = tally_checkout(client, "solver", 1, NULL);
    CHECK(lease != NULL, "checkout");
    uint64_t id = tally_lease_id(lease);
    printf("lease: %016llx\n", (unsigned long long)id);
    ok("connected past a dead first server");

    /* The driver stops this process past the idle timeout, then continues it. */
    wait_for_driver("stop me");
    /* For 10 s (several heartbeats): reconnecting at most, never lost; active at the end,
     * the same lease. */
    for (int i = 0; i < 100; i++) {
        char why[256] = "";
        if (tally_lease_status(lease) == TALLY_STATUS_LOST) {
            tally_lease_reason(lease, why, sizeof why);
            CHECK(0, "lost after the pause: %s", why);
        }
        pause_ms(100);
    }
    CHECK(tally_lease_status(lease) == TALLY_STATUS_ACTIVE, "status %d after the pause",
          tally_lease_status(lease));
    CHECK(tally_lease_id(lease) == id, "another lease");
    ok("the same lease after a pause past the idle timeout");
    tally_checkin(lease);

    int64_t until = 0;
    CHECK(tally_borrow(client, "solver", 1, NULL, 3600, &until) == 0, "borrow");
    tally_client_free(client);
    wait_for_driver("server gone");
    client = tally_connect_demo(servers);
    CHECK(client != NULL, "connect with no server but a borrowed seat");
    lease = tally_checkout(client, "solver", 1, NULL);
    CHECK(lease != NULL, "checkout of the borrowed seat");
    CHECK(tally_lease_status(lease) == TALLY_STATUS_BORROWED, "status %d",
          tally_lease_status(lease));
    tally_lease *viewer = tally_checkout(client, "viewer", 1, NULL);
    CHECK(viewer == NULL && tally_last_error_code() == TALLY_ERR_UNAVAILABLE,
          "viewer was not borrowed");
    tally_lease_free(lease);
    ok("a borrowed seat with the server gone");
    tally_client_free(client);
    printf("done\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "vendor") == 0) return vendor(argv[2]);
    if (argc == 3 && strcmp(argv[1], "demo") == 0) return demo(argv[2]);
    if (argc == 3 && strcmp(argv[1], "faults") == 0) return faults(argv[2]);
    fprintf(stderr, "usage: %s vendor VERSION | demo SERVER\n", argv[0]);
    return TALLY_ERR_USAGE;
}
