// vigil-storm: the guest side of the storm benchmark (tests/examples/tenant_storm.rs): ROUNDS
// rounds of five socket calls Vigil hooks, allowed and denied mixed, every allowed one followed
// by nothing else than its own datagram, each datagram numbered so the outside can tell which
// allowed flow carried it:
//   connect(fresh UDP socket, ADDR:ALLOW_C)            allowed   (connect)
//   sendto(that socket, "c<i>", ADDR:ALLOW_C)          allowed   (sendmsg with a destination)
//   connect(UDP socket, ADDR:DENY)                     denied    (EPERM)
//   sendto(fresh UDP socket, "s<i>", ADDR:ALLOW_S)     allowed
//   sendto(UDP socket, "x", ADDR:DENY)                 denied    (EPERM)
// It prints a console marker before and after (the VMM's RSS is read at each), and one line of
// counts: calls made by kind and outcome, and outcomes it did not expect. An allowed sendto that
// fails with EPERM is counted apart (sendto_refused): a tier refused its verdict (the tenant's
// verdict quota, a full table), and Vigil denies such a call rather than let it out unopened.
// Usage: vigil-storm ROUNDS ADDR ALLOW_C ALLOW_S DENY
// Built by the benchmark (cc -static) and added to a copy of the tenant's initramfs: it is not
// part of the tenant image (scripts/tenant), whose other users need not rebuild it.
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in to(const char *addr, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, addr, &a.sin_addr);
    return a;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: vigil-storm ROUNDS ADDR ALLOW_C ALLOW_S DENY\n");
        return 2;
    }
    long rounds = atol(argv[1]);
    struct sockaddr_in allow_c = to(argv[2], atoi(argv[3]));
    struct sockaddr_in allow_s = to(argv[2], atoi(argv[4]));
    struct sockaddr_in deny = to(argv[2], atoi(argv[5]));
    const struct sockaddr *ac = (const struct sockaddr *)&allow_c;
    const struct sockaddr *as = (const struct sockaddr *)&allow_s;
    const struct sockaddr *dn = (const struct sockaddr *)&deny;
    socklen_t len = sizeof(struct sockaddr_in);
    int denied_socket = socket(AF_INET, SOCK_DGRAM, 0);
    if (denied_socket < 0) {
        perror("vigil-storm: socket");
        return 1;
    }
    long connect_ok = 0, connect_eperm = 0, sendto_ok = 0, sendto_eperm = 0, sendto_refused = 0,
         unexpected = 0;
    char payload[32];

    printf("VIGIL-STORM start\n");
    fflush(stdout);
    for (long i = 0; i < rounds; i++) {
        int c = socket(AF_INET, SOCK_DGRAM, 0);
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (c < 0 || s < 0) {
            unexpected++;
            break;
        }
        if (connect(c, ac, len) == 0)
            connect_ok++;
        else
            unexpected++;
        int n = snprintf(payload, sizeof payload, "c%ld", i);
        if (sendto(c, payload, n, 0, ac, len) == n)
            sendto_ok++;
        else if (errno == EPERM)
            sendto_refused++;
        else
            unexpected++;
        if (connect(denied_socket, dn, len) != 0 && errno == EPERM)
            connect_eperm++;
        else
            unexpected++;
        n = snprintf(payload, sizeof payload, "s%ld", i);
        if (sendto(s, payload, n, 0, as, len) == n)
            sendto_ok++;
        else if (errno == EPERM)
            sendto_refused++;
        else
            unexpected++;
        if (sendto(denied_socket, "x", 1, 0, dn, len) < 0 && errno == EPERM)
            sendto_eperm++;
        else
            unexpected++;
        close(c);
        close(s);
    }
    printf("VIGIL-STORM end\n");
    printf("VIGIL-STORM counts rounds=%ld connect_ok=%ld connect_eperm=%ld sendto_ok=%ld "
           "sendto_eperm=%ld sendto_refused=%ld unexpected=%ld\n",
           rounds, connect_ok, connect_eperm, sendto_ok, sendto_eperm, sendto_refused, unexpected);
    fflush(stdout);
    return unexpected != 0;
}
