/*
 * Baseline for bench_pageserver.py: a minimal page-at-a-time userfaultfd handler in C
 * speaking the same protocol as `fcvm snapshot serve` (Firecracker's: one message with
 * a JSON array of {base_host_virt_addr, size, offset, ...} plus the uffd as
 * SCM_RIGHTS). It serves one VM at a time, every fault with one 4 KiB UFFDIO_COPY from
 * a read-only shared mapping of the memory file (MAP_POPULATE, as the Python server
 * populates its mapping too: UFFDIO_COPY from an unmapped source page costs the kernel
 * a fault-and-retry), until the VM closes its socket.
 * No zero-page detection, no blocks, no prefetch: the reference the Python server is
 * measured against.
 *
 *   uffd_handler SOCKET MEMORY_FILE
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_REGIONS 32

struct region {
    uint64_t base, size, offset;
};

static int parse_field(const char *obj, const char *end, const char *key, uint64_t *out)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(obj, pat);
    if (!p || p >= end)
        return -1;
    p = strchr(p + strlen(pat), ':');
    if (!p || p >= end)
        return -1;
    *out = strtoull(p + 1, NULL, 10);
    return 0;
}

static int parse_regions(const char *json, struct region *regs)
{
    int n = 0;
    const char *p = json;
    while (n < MAX_REGIONS && (p = strchr(p, '{')) != NULL) {
        const char *end = strchr(p, '}');
        if (!end)
            return -1;
        if (parse_field(p, end, "base_host_virt_addr", &regs[n].base) ||
            parse_field(p, end, "size", &regs[n].size) ||
            parse_field(p, end, "offset", &regs[n].offset))
            return -1;
        n++;
        p = end + 1;
    }
    return n;
}

static void serve(int conn, const char *mem, uint64_t mem_size)
{
    char buf[65536];
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {buf, sizeof buf - 1};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    ssize_t got = recvmsg(conn, &mh, 0);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    if (got <= 0 || !cm || cm->cmsg_type != SCM_RIGHTS) {
        fprintf(stderr, "uffd_handler: bad handshake\n");
        return;
    }
    buf[got] = 0;
    int uffd;
    memcpy(&uffd, CMSG_DATA(cm), sizeof uffd);
    struct region regs[MAX_REGIONS];
    int nregs = parse_regions(buf, regs);
    for (int i = 0; i < nregs; i++)
        if (regs[i].offset + regs[i].size > mem_size)
            nregs = -1;
    if (nregs <= 0) {
        fprintf(stderr, "uffd_handler: bad regions\n");
        close(uffd);
        return;
    }
    struct pollfd pfd[2] = {{uffd, POLLIN, 0}, {conn, POLLIN, 0}};
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pfd[1].revents) {
            char c;
            if (recv(conn, &c, 1, MSG_DONTWAIT) <= 0)
                break; /* the VM is gone */
        }
        if (!(pfd[0].revents & POLLIN))
            continue;
        struct uffd_msg msg;
        ssize_t r = read(uffd, &msg, sizeof msg);
        if (r != sizeof msg)
            continue; /* EAGAIN: another waiter took it */
        if (msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t addr = msg.arg.pagefault.address & ~(PAGE - 1);
        for (int i = 0; i < nregs; i++) {
            if (addr < regs[i].base || addr >= regs[i].base + regs[i].size)
                continue;
            struct uffdio_copy cp = {
                .dst = addr,
                .src = (uint64_t)(uintptr_t)(mem + regs[i].offset + (addr - regs[i].base)),
                .len = PAGE,
                .mode = 0,
            };
            if (ioctl(uffd, UFFDIO_COPY, &cp) < 0 && errno == EEXIST) {
                struct uffdio_range rg = {addr, PAGE};
                ioctl(uffd, UFFDIO_WAKE, &rg);
            }
            break;
        }
    }
    close(uffd);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET MEMORY_FILE\n", argv[0]);
        return 2;
    }
    int mfd = open(argv[2], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (mfd < 0 || fstat(mfd, &st) < 0) {
        perror("memory file");
        return 1;
    }
    const char *mem = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED | MAP_POPULATE, mfd, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    unlink(argv[1]);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 16) < 0) {
        perror("socket");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        int conn = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR)
                continue;
            perror("accept");
            return 1;
        }
        serve(conn, mem, (uint64_t)st.st_size);
        close(conn);
    }
}
