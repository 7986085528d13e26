/* The sandbox probe: run inside `mcpbox run` (and, for comparison, directly by the test), it
 * tries one thing and reports what happened on one line:
 *
 *     RESULT <check> <ok|denied> <detail>
 *
 * `denied` carries the errno name; `ok` carries what was seen. The probe itself always exits 0
 * (unless the sandbox kills it): the Rust tests decide what is right for the mode they run in.
 *
 * Usage: probe CHECK [ARGS...]. Checks that leave processes behind take a marker argument that
 * the test looks for in /proc/PID/cmdline (forked children inherit the argv). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static const char *check;

static const char *ename(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case EROFS: return "EROFS";
    case ENOSYS: return "ENOSYS";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOSPC: return "ENOSPC";
    case EDQUOT: return "EDQUOT";
    case EFBIG: return "EFBIG";
    case ELOOP: return "ELOOP";
    default: {
        static char buf[32];
        snprintf(buf, sizeof buf, "E%d", e);
        return buf;
    }
    }
}

static void ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ok(const char *fmt, ...) {
    va_list ap;
    printf("RESULT %s ok ", check);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static void denied(int e) {
    printf("RESULT %s denied %s\n", check, ename(e));
    fflush(stdout);
}

/* ok / denied from a syscall-style return value. */
static void report(long r) {
    int e = errno;
    if (r < 0) denied(e);
    else ok("%ld", r);
}

static int need(int argc, int n) {
    if (argc < n) {
        fprintf(stderr, "probe %s: missing arguments\n", check);
        exit(2);
    }
    return 1;
}

/* Printable copy of up to n bytes: NULs and control characters become spaces. */
static void printable(char *buf, ssize_t n) {
    for (ssize_t i = 0; i < n; i++)
        if ((unsigned char)buf[i] < 0x20 || (unsigned char)buf[i] > 0x7e) buf[i] = ' ';
    buf[n] = 0;
}

static void do_read(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return denied(errno);
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int e = errno;
    close(fd);
    if (n < 0) return denied(e);
    printable(buf, n);
    ok("%zd bytes: %s", n, buf);
}

static void do_write(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return denied(errno);
    ssize_t n = write(fd, "probe\n", 6);
    int e = errno;
    close(fd);
    if (n < 0) return denied(e);
    ok("wrote %zd bytes", n);
}

/* Opening for writing is enough to show the file is writable; nothing is written. */
static void do_open_w(const char *path) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return denied(errno);
    close(fd);
    ok("opened for writing");
}

static void do_proc_pids(void) {
    DIR *d = opendir("/proc");
    if (!d) return denied(errno);
    int count = 0;
    char list[1024] = "";
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        strtol(e->d_name, &end, 10);
        if (*end || !e->d_name[0]) continue;
        count++;
        if (strlen(list) + strlen(e->d_name) + 2 < sizeof list) {
            strcat(list, " ");
            strcat(list, e->d_name);
        }
    }
    closedir(d);
    ok("%d pids:%s", count, list);
}

static void do_connect_tcp(int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return denied(errno);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r = connect(s, (struct sockaddr *)&a, sizeof a);
    int e = errno;
    close(s);
    if (r < 0) return denied(e);
    ok("connected to 127.0.0.1:%d", port);
}

static void do_connect_abstract(const char *name) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return denied(errno);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t len = strlen(name);
    if (len > sizeof a.sun_path - 2) len = sizeof a.sun_path - 2;
    memcpy(a.sun_path + 1, name, len); /* leading NUL: the abstract namespace */
    int r = connect(s, (struct sockaddr *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + len);
    int e = errno;
    close(s);
    if (r < 0) return denied(e);
    ok("connected to @%s", name);
}

/* A child that waits to be killed (used as a ptrace target and as a leftover). */
/* Its stdio goes to /dev/null, so that it never holds the test's pipes open. */
static void detach_stdio(void) {
    int fd = open("/dev/null", O_RDWR);
    if (fd >= 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        if (fd > 2) close(fd);
    }
}

static pid_t pause_child(void) {
    pid_t c = fork();
    if (c == 0) {
        detach_stdio();
        for (;;) pause();
    }
    return c;
}

static void do_ptrace(pid_t pid) {
    long r = ptrace(PTRACE_ATTACH, pid, 0, 0);
    int e = errno;
    if (r == 0) {
        waitpid(pid, NULL, __WALL);
        ptrace(PTRACE_DETACH, pid, 0, 0);
        return ok("attached to %d", (int)pid);
    }
    denied(e);
}

/* Run fn in a forked child (so that a success changes nothing here) and report its errno. */
static void in_child(int (*fn)(void)) {
    int p[2];
    if (pipe(p) < 0) return denied(errno);
    pid_t c = fork();
    if (c < 0) return denied(errno);
    if (c == 0) {
        close(p[0]);
        int e = fn();
        if (write(p[1], &e, sizeof e) < 0) _exit(1);
        _exit(0);
    }
    close(p[1]);
    int e = -1;
    ssize_t n = read(p[0], &e, sizeof e);
    close(p[0]);
    waitpid(c, NULL, 0);
    if (n != sizeof e) return denied(EIO);
    if (e == 0) ok("succeeded in a child");
    else denied(e);
}

static int try_unshare_user(void) { return unshare(CLONE_NEWUSER) == 0 ? 0 : errno; }

/* mount(2) on a scratch directory. Unconfined the child first makes its own user and mount
 * namespace (where shared mounts turn into slaves), so a success touches nothing of the host;
 * confined, unshare fails and mount must fail on its own. */
static int try_mount(void) {
    char dir[] = "/tmp/probe-mnt-XXXXXX";
    if (!mkdtemp(dir)) strcpy(dir, "/tmp");
    (void)unshare(CLONE_NEWUSER | CLONE_NEWNS);
    int r = mount("probe", dir, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k");
    int e = r == 0 ? 0 : errno;
    if (r == 0) umount2(dir, MNT_DETACH);
    rmdir(dir);
    return e;
}

/* TIOCSTI on a pipe: unconfined the kernel answers ENOTTY (not a terminal); the filter answers
 * EPERM before the kernel ever looks at the descriptor. */
static void do_tiocsti(void) {
    int p[2];
    if (pipe(p) < 0) return denied(errno);
    char c = 'x';
    int r = ioctl(p[0], TIOCSTI, &c);
    int e = errno;
    close(p[0]);
    close(p[1]);
    errno = e;
    report(r);
}

/* getpid through the 32-bit ABI: eax = 20 (__NR_getpid on i386). */
static void do_int80(void) {
    long ret = 20;
    __asm__ volatile("int $0x80" : "+a"(ret) : : "memory");
    if (ret < 0 && ret > -4096) return denied((int)-ret);
    ok("%ld (getpid() = %d)", ret, (int)getpid());
}

static void do_forkbomb(int max) {
    pid_t *kids = calloc(max, sizeof *kids);
    int n = 0, e = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (; n < max; n++) {
        pid_t c = fork();
        if (c < 0) {
            e = errno;
            break;
        }
        if (c == 0) {
            for (;;) pause();
        }
        kids[n] = c;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    if (e) printf("RESULT %s denied %s after %d forks in %ld ms\n", check, ename(e), n, ms);
    else printf("RESULT %s ok %d forks in %ld ms\n", check, n, ms);
    fflush(stdout);
}

static void do_memory(long mib) {
    size_t len = (size_t)mib << 20;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return denied(errno);
    printf("PROGRESS mapped %ld MiB\n", mib);
    fflush(stdout);
    for (size_t i = 0; i < len; i += 4096) p[i] = 1;
    ok("touched %ld MiB", mib);
}

/* Write PATH in 1 MiB pieces until a write fails or MAX MiB are written; fsync at the end
 * (a filesystem may report a full disk only then). */
static void do_fill(const char *path, long max_mib) {
    static char buf[1 << 20];
    memset(buf, 'x', sizeof buf);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return denied(errno);
    long mib = 0;
    for (; mib < max_mib; mib++) {
        size_t done = 0;
        while (done < sizeof buf) {
            ssize_t n = write(fd, buf + done, sizeof buf - done);
            if (n < 0) {
                int e = errno;
                printf("RESULT %s denied %s after %ld MiB\n", check, ename(e), mib);
                close(fd);
                return;
            }
            done += n;
        }
    }
    if (fsync(fd) < 0) {
        int e = errno;
        printf("RESULT %s denied %s at fsync after %ld MiB\n", check, ename(e), mib);
        close(fd);
        return;
    }
    close(fd);
    ok("wrote %ld MiB", mib);
}

static long ms_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

/* N processes spin for SECS seconds of wall time; report the CPU time they got, in ms and in
 * thousandths of a core (CPU time / wall time). */
static void do_spin(double secs, int n) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long until = (long)(secs * 1000);
    for (int i = 0; i < n; i++) {
        pid_t c = fork();
        if (c < 0) return denied(errno);
        if (c == 0) {
            volatile unsigned long x = 0;
            while (ms_since(&t0) < until) x++;
            _exit(0);
        }
    }
    while (wait(NULL) > 0) {}
    long wall = ms_since(&t0);
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    long cpu = ru.ru_utime.tv_sec * 1000 + ru.ru_utime.tv_usec / 1000 + ru.ru_stime.tv_sec * 1000 + ru.ru_stime.tv_usec / 1000;
    ok("cpu_ms %ld wall_ms %ld permille %ld", cpu, wall, wall > 0 ? cpu * 1000 / wall : 0);
}

static void do_status(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return denied(errno);
    char line[256], out[512] = "";
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "NoNewPrivs:", 11) || !strncmp(line, "CapEff:", 7) || !strncmp(line, "CapPrm:", 7) ||
            !strncmp(line, "CapBnd:", 7) || !strncmp(line, "Seccomp:", 8) || !strncmp(line, "Uid:", 4) ||
            !strncmp(line, "Cpus_allowed_list:", 18)) {
            line[strcspn(line, "\n")] = 0;
            for (char *c = line; *c; c++)
                if (*c == '\t') *c = ' ';
            strncat(out, line, sizeof out - strlen(out) - 2);
            strcat(out, ";");
        }
    }
    fclose(f);
    ok("%s", out);
}

static int run_check(int argc, char **argv) {
    check = argv[1];
    if (!strcmp(check, "read") && need(argc, 3)) do_read(argv[2]);
    else if (!strcmp(check, "write") && need(argc, 3)) do_write(argv[2]);
    else if (!strcmp(check, "open_w") && need(argc, 3)) do_open_w(argv[2]);
    else if (!strcmp(check, "proc_pids")) do_proc_pids();
    else if (!strcmp(check, "tcp") && need(argc, 3)) do_connect_tcp(atoi(argv[2]));
    else if (!strcmp(check, "abstract") && need(argc, 3)) do_connect_abstract(argv[2]);
    else if (!strcmp(check, "kill") && need(argc, 4)) {
        /* kill PID SIG; PID "ppid" means getppid() */
        pid_t pid = strcmp(argv[2], "ppid") ? atoi(argv[2]) : getppid();
        long r = kill(pid, atoi(argv[3]));
        int e = errno;
        if (r < 0) denied(e);
        else ok("signalled %d", (int)pid);
        usleep(300 * 1000);
        printf("ALIVE after kill\n");
    } else if (!strcmp(check, "ptrace") && need(argc, 3)) {
        pid_t pid = strcmp(argv[2], "ppid") ? atoi(argv[2]) : getppid();
        do_ptrace(pid);
    } else if (!strcmp(check, "ptrace_child")) {
        /* A descendant: attachable unconfined whatever Yama says. */
        pid_t c = pause_child();
        do_ptrace(c);
        kill(c, SIGKILL);
        waitpid(c, NULL, 0);
    } else if (!strcmp(check, "setuid0")) {
        report(syscall(SYS_setuid, 0));
    } else if (!strcmp(check, "setuid_self")) {
        /* setting the uid one already has succeeds for anyone, unless the filter refuses it */
        report(syscall(SYS_setuid, getuid()));
    } else if (!strcmp(check, "unshare_user")) in_child(try_unshare_user);
    else if (!strcmp(check, "mount")) in_child(try_mount);
    else if (!strcmp(check, "keyctl")) {
        /* KEYCTL_GET_KEYRING_ID (0) of the session keyring (-3) */
        report(syscall(SYS_keyctl, 0, -3, 0));
    } else if (!strcmp(check, "bpf")) {
        /* An invalid command with an empty attr: EINVAL from the kernel, EPERM from the filter. */
        report(syscall(SYS_bpf, 9999, NULL, 0));
    } else if (!strcmp(check, "perf_event_open")) {
        /* A NULL attr: EFAULT from the kernel, EPERM from the filter. */
        report(syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    } else if (!strcmp(check, "userfaultfd")) {
        /* UFFD_USER_MODE_ONLY (1) is allowed to unprivileged users. */
        long r = syscall(SYS_userfaultfd, 1 | O_CLOEXEC);
        report(r);
    } else if (!strcmp(check, "io_uring_setup")) {
        char params[120];
        memset(params, 0, sizeof params);
        report(syscall(SYS_io_uring_setup, 1, params));
    } else if (!strcmp(check, "tiocsti")) do_tiocsti();
    else if (!strcmp(check, "int80")) do_int80();
    else if (!strcmp(check, "forkbomb") && need(argc, 3)) do_forkbomb(atoi(argv[2]));
    else if (!strcmp(check, "memory") && need(argc, 3)) do_memory(atol(argv[2]));
    else if (!strcmp(check, "status")) do_status();
    else if (!strcmp(check, "fill") && need(argc, 4)) do_fill(argv[2], atol(argv[3]));
    else if (!strcmp(check, "spin") && need(argc, 4)) do_spin(atof(argv[2]), atoi(argv[3]));
    else if (!strcmp(check, "orphan")) {
        /* probe orphan MARKER: leave a child behind (in its own session) and exit. */
        pid_t c = fork();
        if (c == 0) {
            setsid();
            detach_stdio();
            for (;;) pause();
        }
        ok("left child %d", (int)c);
    } else if (!strcmp(check, "daemon")) {
        /* probe daemon MARKER [stay]: double-fork a daemon in a session of its own that keeps
         * stdout and stderr open and waits forever; then exit (with `stay`, wait forever too). */
        int p[2];
        if (pipe(p) != 0) { denied(errno); return 0; }
        pid_t c = fork();
        if (c == 0) {
            setsid();
            if (fork() == 0) {
                pid_t me = getpid();
                if (write(p[1], &me, sizeof me) != sizeof me) _exit(1);
                for (;;) pause();
            }
            _exit(0);
        }
        pid_t d = -1;
        close(p[1]);
        waitpid(c, NULL, 0);
        if (read(p[0], &d, sizeof d) != sizeof d) { denied(EIO); return 0; }
        ok("daemon %d", (int)d);
        if (argc > 3 && !strcmp(argv[3], "stay")) for (;;) pause();
    } else if (!strcmp(check, "pause")) {
        /* probe pause MARKER: a child and ourselves, both waiting forever. */
        pid_t c = pause_child();
        ok("pid %d uid %d child %d", (int)getpid(), (int)getuid(), (int)c);
        for (;;) pause();
    } else if (!strcmp(check, "sigterm")) {
        /* Say which of SIGUSR1, SIGUSR2 and SIGHUP arrive; exit 3 on SIGTERM, after saying so. */
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGTERM);
        sigaddset(&s, SIGUSR1);
        sigaddset(&s, SIGUSR2);
        sigaddset(&s, SIGHUP);
        sigprocmask(SIG_BLOCK, &s, NULL);
        ok("waiting for SIGTERM");
        for (;;) {
            int sig = 0;
            sigwait(&s, &sig);
            printf("GOT %s\n", sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : sig == SIGUSR2 ? "SIGUSR2" : "SIGHUP");
            fflush(stdout);
            if (sig == SIGTERM)
                return 3;
        }
    } else if (!strcmp(check, "selfkill") && need(argc, 3)) {
        ok("raising %s", argv[2]);
        signal(atoi(argv[2]), SIG_DFL);
        raise(atoi(argv[2]));
        return 0;
    } else if (!strcmp(check, "uid")) {
        ok("%d", (int)getuid());
    } else {
        fprintf(stderr, "probe: unknown check %s\n", check);
        return 2;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: probe CHECK [ARGS...] | probe each CHECK...\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(argv[1], "each")) return run_check(argc, argv);
    /* probe each CHECK...: several argument-less checks in one run */
    for (int i = 2; i < argc; i++) {
        char *one[] = {argv[0], argv[i], NULL};
        int r = run_check(2, one);
        if (r) return r;
    }
    return 0;
}
