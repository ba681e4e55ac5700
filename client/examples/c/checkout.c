/* Checks a seat out through the tally C API, holds it briefly, and checks it in.
 *
 * The vendor public key is compiled in: a key read from a file at run time is a key the
 * customer can replace with their own. Make vendor_key.h from vendor.pub with
 *
 *   { echo 'static const char VENDOR_KEY[] ='; sed -e 's/^/"/' -e 's/$/\\n"/' vendor.pub; echo ';'; } > vendor_key.h
 *   cc checkout.c -I client/include -I . -L target/release -ltally_client -o checkout
 *   ./checkout lic1.example.com:27300 solver     # or TALLY_SERVER=... ./checkout "" solver
 *
 * Built with -DTALLY_DEMO it trusts the public demo key instead (for `tallyd demo`;
 * never ship that). Exits 0 on success, or with the TALLY_ERR_* code of the failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <tally.h>
#ifndef TALLY_DEMO
#include "vendor_key.h"
#endif

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s SERVER FEATURE\n", argv[0]);
        return TALLY_ERR_USAGE;
    }
#ifdef TALLY_DEMO
    tally_client *client = tally_connect_demo(argv[1]);
#else
    tally_client *client = tally_connect_key(argv[1], VENDOR_KEY);
#endif
    if (client == NULL) {
        fprintf(stderr, "connect: %s\n", tally_last_error());
        return tally_last_error_code();
    }
    tally_lease *lease = tally_checkout(client, argv[2], 1, "2027.1");
    if (lease == NULL) {
        int code = tally_last_error_code();
        tally_denial why;
        if (tally_last_denial(&why) == 0)
            fprintf(stderr, "checkout: %s (%s)\n", tally_last_error(), tally_denial_name(why.code));
        else
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
