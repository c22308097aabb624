// vigil-trap-bench: the guest side of the trap benchmark (scripts/bench trap_*). Runs four loops of
// N system calls and prints a console marker before and after each, so the VMM timestamps every
// phase with the host's clock (the guest's clock is dilated on an emulating host):
//   base     getsockopt(SO_TYPE): a socket system call Vigil does not hook
//   bare     bind() on a bound socket (EINVAL): hooked, with the VMM told to do no work there
//            (VIGIL_BARE_HOOKS=bind): the bare KVM_EXIT_DEBUG round trip
//   full     listen() on a listening socket: hooked, attributed, decided, verdict produced
//   connect  connect() of a UDP socket: hooked like full; attributed connects per second
// Usage: vigil-trap-bench N PORT
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static void marker(const char *what) {
    // One write per marker: the console line is the timestamp.
    printf("VIGIL-BENCH %s\n", what);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: vigil-trap-bench N PORT\n");
        return 2;
    }
    long n = atol(argv[1]);
    int port = atoi(argv[2]);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(port)};
    local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int tcp = socket(AF_INET, SOCK_STREAM, 0);
    if (tcp < 0 || bind(tcp, (struct sockaddr *)&local, sizeof local) != 0 || listen(tcp, 8) != 0) {
        perror("vigil-trap-bench: set-up");
        return 1;
    }
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    if (udp < 0) {
        perror("vigil-trap-bench: udp socket");
        return 1;
    }
    int type;
    socklen_t len = sizeof type;
    long failures = 0;

    marker("base-start");
    for (long i = 0; i < n; i++)
        failures += getsockopt(tcp, SOL_SOCKET, SO_TYPE, &type, &len) != 0;
    marker("base-end");

    marker("bare-start");
    for (long i = 0; i < n; i++)
        bind(tcp, (struct sockaddr *)&local, sizeof local); // EINVAL: already bound
    marker("bare-end");

    marker("full-start");
    for (long i = 0; i < n; i++)
        failures += listen(tcp, 8) != 0;
    marker("full-end");

    struct sockaddr_in remote = local;
    remote.sin_port = htons(port + 1);
    marker("connect-start");
    for (long i = 0; i < n; i++)
        failures += connect(udp, (struct sockaddr *)&remote, sizeof remote) != 0;
    marker("connect-end");

    printf("VIGIL-BENCH done n=%ld failures=%ld\n", n, failures);
    return failures != 0;
}
