// vigil-listen0: sockets whose local port the kernel picks, the ports Vigil must learn where the
// kernel assigns them.
//   vigil-listen0 MESSAGE [COUNT]   listen() on a TCP socket never bound (inet_csk_listen_start
//                                   -> get_port(0)); prints "port N", then serves MESSAGE to
//                                   COUNT connections (default 1).
//   vigil-listen0 -u SECONDS        bind() a UDP socket to 0.0.0.0:0; prints "port N", then
//                                   "got TEXT" for each datagram that arrives within SECONDS.
// Prints "<call>: <error>" and exits 1 on failure.
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int print_port(int fd) {
    struct sockaddr_in me;
    socklen_t len = sizeof me;
    if (getsockname(fd, (struct sockaddr *)&me, &len) < 0) {
        printf("getsockname: %s\n", strerror(errno));
        return 1;
    }
    printf("port %d\n", ntohs(me.sin_port));
    fflush(stdout);
    return 0;
}

static int udp(int seconds) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        printf("socket: %s\n", strerror(errno));
        return 1;
    }
    struct sockaddr_in any = {.sin_family = AF_INET};
    if (bind(fd, (struct sockaddr *)&any, sizeof any) < 0) {
        printf("bind: %s\n", strerror(errno));
        return 1;
    }
    if (print_port(fd)) return 1;
    struct timeval tv = {.tv_sec = seconds};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[256];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf - 1, 0)) >= 0) {
        buf[n] = 0;
        printf("got %s\n", buf);
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "-u") == 0) return udp(atoi(argv[2]));
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: vigil-listen0 MESSAGE [COUNT] | vigil-listen0 -u SECONDS\n");
        return 2;
    }
    int count = argc == 3 ? atoi(argv[2]) : 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        printf("socket: %s\n", strerror(errno));
        return 1;
    }
    if (listen(fd, 4) < 0) {
        printf("listen: %s\n", strerror(errno));
        return 1;
    }
    if (print_port(fd)) return 1;
    for (int i = 0; i < count; i++) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            printf("accept: %s\n", strerror(errno));
            return 1;
        }
        dprintf(c, "%s\n", argv[1]);
        close(c);
    }
    return 0;
}
