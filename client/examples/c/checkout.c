/* Checks a seat out through the tally C API, holds it briefly, and checks it in.
 *
 *   cc checkout.c -I client/include -L target/debug -ltally_client -o checkout
 *   LD_LIBRARY_PATH=target/debug ./checkout 127.0.0.1:27300 solver
 *
 * Exits 0 on success, or with the TALLY_ERR_* code of the failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <tally.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s SERVER FEATURE [VENDOR_KEY_FILE]\n", argv[0]);
        return TALLY_ERR_USAGE;
    }
    const char *key = argc > 3 ? argv[3] : NULL;
    tally_client *client = tally_connect(argv[1], key, key == NULL);
    if (client == NULL) {
        fprintf(stderr, "connect: %s\n", tally_last_error());
        return tally_last_error_code();
    }
    tally_lease *lease = tally_checkout(client, argv[2], 1, "2027.1");
    if (lease == NULL) {
        int code = tally_last_error_code();
        fprintf(stderr, "checkout: %s\n", tally_last_error());
        tally_client_free(client);
        return code;
    }
    printf("checked out %s, status %d\n", argv[2], tally_lease_status(lease));
    /* What the vendor wants done if the seat is lost for longer than a grace. */
    uint64_t grace = 0;
    int on_lost = tally_lost_seat_terms(client, argv[2], &grace);
    if (on_lost >= 0) {
        printf("without a seat: %s after %llu s\n",
               on_lost == TALLY_ON_LOST_SEAT_STOP ? "stop" : "warn",
               (unsigned long long)grace);
    }
    fflush(stdout);
    /* The lease heartbeats in the background; an application would work here. */
    if (tally_checkin(lease) != 0) {
        fprintf(stderr, "checkin: %s\n", tally_last_error());
        tally_client_free(client);
        return tally_last_error_code();
    }
    printf("checked in\n");
    /* NULL is accepted everywhere a handle is freed. */
    tally_lease_free(NULL);
    tally_client_free(client);
    return 0;
}
