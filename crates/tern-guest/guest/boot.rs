//! Ring-0 part of the test guest: the PVH entry, the AP entry, long mode, per-CPU TSS, the IDT
//! and the two exception handlers that do the guest's port I/O.
//!
//! On kvm-pvm (see shared/HOST-KVM.md) ring-0 code of a non-PVM guest is emulated one instruction
//! at a time, so this part is kept short and runs once per CPU; all real work happens in ring 3.
//! Port I/O from ring 3 raises #GP there, so ring 3 asks ring 0 for it through `ud2`: the #UD
//! handler reads the request in %rax (0 = write the NUL-terminated string at %rsi to COM1,
//! 1 = power off) and resumes after the `ud2`.
//!
//! Boot protocols:
//! - BSP: PVH (`XEN_ELFNOTE_PHYS32_ENTRY`), 32-bit protected mode, paging off, %ebx = start_info.
//! - APs: the "Tern" ELF note (type 1) names `tern_ap_entry` and the address of `tern_ncpus`. A
//!   VMM that honours it writes the vCPU count there and starts each AP at `tern_ap_entry` in the
//!   same state as the PVH entry, with %esi = the CPU index. Other VMMs leave `tern_ncpus` at 1.
//!
//! Page tables are static: 2 MiB pages identity-mapping the first 64 GiB, user-accessible (ring 3
//! reaches virtio-mmio registers through them: an access to unbacked memory exits to the VMM),
//! write-back except the last 32 MiB below 4 GiB, which is uncached (device windows live there).

core::arch::global_asm!(
    r#"
    .set MAX_CPUS, 32
    .set KSTACK_SHIFT, 13
    .set USTACK_SHIFT, 16
    .set COM1, 0x3f8
    .set SHUTDOWN_PORT, 0x604
    .set MSR_EFER, 0xc0000080
    .set MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01
    .set GDT_TSS0, 0x40

    .section .note.pvh, "a"
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long _start

    .section .note.tern, "a"
    .balign 4
    .long 5
    .long 16
    .long 1
    .asciz "Tern"
    .balign 4
    .quad tern_ap_entry
    .quad tern_ncpus

    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cli
    movl %ebx, boot_start_info
    xorl %esi, %esi
    jmp common32

    .globl tern_ap_entry
tern_ap_entry:
    cli
common32:
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    lgdt gdtr
    movl %cr0, %eax
    andl $0xfffffffb, %eax
    orl $0x80000003, %eax
    movl %eax, %cr0
    ljmp $0x10, $long_mode

    .code64
long_mode:
    movl $0x18, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %esi
    movq %rsi, %rax
    incq %rax
    shlq $KSTACK_SHIFT, %rax
    leaq kstacks(%rip), %rsp
    addq %rax, %rsp
    /* this CPU's TSS: rsp0 and an I/O map base past the limit */
    movq %rsi, %rdi
    shlq $7, %rdi
    leaq tss_area(%rip), %rax
    addq %rax, %rdi
    movq %rsp, 4(%rdi)
    movw $104, 102(%rdi)
    /* its descriptor */
    movq %rsi, %rcx
    shlq $4, %rcx
    leaq gdt_tss(%rip), %rdx
    addq %rcx, %rdx
    movq %rdi, %rax
    movw $103, (%rdx)
    movw %ax, 2(%rdx)
    shrq $16, %rax
    movb %al, 4(%rdx)
    movb $0x89, 5(%rdx)
    movb $0, 6(%rdx)
    movb %ah, 7(%rdx)
    shrq $16, %rax
    movl %eax, 8(%rdx)
    movl $0, 12(%rdx)
    leaq GDT_TSS0(%rcx), %rax
    ltr %ax
    testl %esi, %esi
    jnz 2f
    call build_idt
    movl $MSR_KVM_SYSTEM_TIME_NEW, %ecx
    leaq kvmclock_area(%rip), %rax
    orl $1, %eax
    xorl %edx, %edx
    .globl kvmclock_wrmsr
kvmclock_wrmsr:
    wrmsr
    movl $1, idt_ready(%rip)
    jmp 3f
2:  pause
    cmpl $0, idt_ready(%rip)
    je 2b
3:  lidt idtr(%rip)
    movq %rsi, %rax
    incq %rax
    shlq $USTACK_SHIFT, %rax
    leaq ustacks(%rip), %rcx
    addq %rcx, %rax
    pushq $0x2b
    pushq %rax
    pushq $0x2
    pushq $0x33
    leaq user_entry(%rip), %rax
    pushq %rax
    movq %rsi, %rdi
    movl boot_start_info(%rip), %esi
    iretq

/* ring 3 from here */
user_entry:
    call guest_main
4:  jmp 4b

/* build_idt: vectors 0..31 to fault stubs, 6 to ud_handler, 13 to gp_handler */
build_idt:
    xorl %ecx, %ecx
5:  leaq fault_stubs(%rip), %rax
    movq %rcx, %rdx
    shlq $4, %rdx
    addq %rdx, %rax
    call set_gate
    incl %ecx
    cmpl $32, %ecx
    jb 5b
    movl $6, %ecx
    leaq ud_handler(%rip), %rax
    call set_gate
    movl $13, %ecx
    leaq gp_handler(%rip), %rax
    call set_gate
    ret

/* set_gate: vector %ecx, handler %rax; a DPL-0 64-bit interrupt gate */
set_gate:
    leaq idt(%rip), %rdi
    movq %rcx, %rdx
    shlq $4, %rdx
    addq %rdx, %rdi
    movw %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    movq %rax, %rdx
    shrq $16, %rdx
    movw %dx, 6(%rdi)
    shrq $16, %rdx
    movl %edx, 8(%rdi)
    movl $0, 12(%rdi)
    ret

/* #UD: the ring-3 service call (see module doc). Clobbers %rax and %rsi. */
ud_handler:
    pushq %rdx
    pushq %rcx
    movq 16(%rsp), %rcx
    cmpw $0x0b0f, (%rcx)
    jne 9f
    cmpq $1, %rax
    je 8f
    movw $COM1, %dx
6:  lodsb
    testb %al, %al
    jz 7f
    outb %al, %dx
    jmp 6b
7:  addq $2, 16(%rsp)
    popq %rcx
    popq %rdx
    iretq
8:  movw $SHUTDOWN_PORT, %dx
    movw $0x2000, %ax
    outw %ax, %dx
    /* no ACPI power-off port here: a triple fault ends the VM */
    lidt null_idtr(%rip)
    int3
9:  popq %rcx
    popq %rdx
    movl $6, %ebx
    jmp fault_common

/* #GP: the kvmclock MSR may be missing; skip that one wrmsr, anything else is fatal */
gp_handler:
    pushq %rax
    leaq kvmclock_wrmsr(%rip), %rax
    cmpq %rax, 16(%rsp)
    popq %rax
    jne 10f
    addq $2, 8(%rsp)
    addq $8, %rsp
    iretq
10: movl $13, %ebx
    jmp fault_common

    .balign 16
fault_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    movl $vec, %ebx
    jmp fault_common
    .set vec, vec + 1
    .endr

/* print "tern-guest FAULT vec=<hex> <top two stack words>" and halt */
fault_common:
    movw $COM1, %dx
    leaq msg_fault(%rip), %rsi
11: lodsb
    testb %al, %al
    jz 12f
    outb %al, %dx
    jmp 11b
12: movq %rbx, %r8
    call hex64
    movb $' ', %al
    outb %al, %dx
    movq (%rsp), %r8
    call hex64
    movb $' ', %al
    outb %al, %dx
    movq 8(%rsp), %r8
    call hex64
    movb $'\n', %al
    outb %al, %dx
13: hlt
    jmp 13b

/* hex64: %r8 as 16 hex digits to %dx */
hex64:
    movl $16, %ecx
14: rolq $4, %r8
    movb %r8b, %al
    andb $0xf, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe 15f
    addb $7, %al
15: outb %al, %dx
    loop 14b
    ret

    .section .rodata.boot, "a"
msg_fault:
    .asciz "tern-guest FAULT vec="

    .section .data.boot, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x10 kernel code64 */
    .quad 0x00cf92000000ffff    /* 0x18 kernel data */
    .quad 0x00cffa000000ffff    /* 0x23 user code32 */
    .quad 0x00cff2000000ffff    /* 0x2b user data */
    .quad 0x00affa000000ffff    /* 0x33 user code64 */
    .quad 0
gdt_tss:
    .fill MAX_CPUS * 16, 1, 0   /* 0x40 + 16 * cpu: TSS descriptors */
gdt_end:
    .balign 8
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
    .word 0
idtr:
    .word 256 * 16 - 1
    .quad idt
    .balign 8
    .word 0
null_idtr:
    .word 0
    .quad 0
boot_start_info:
    .long 0
idt_ready:
    .long 0

    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept 64
    .quad pd + i * 4096 + 7
    .set i, i + 1
    .endr
    .fill 448, 8, 0
pd:
    .set i, 0
    .rept 64 * 512
    /* 0xfe000000..4 GiB (virtio-mmio windows, IOAPIC, LAPIC): PCD|PWT = uncached */
    .if (i >= 0x7f0) && (i < 0x800)
    .quad (i << 21) | 0x9f
    .else
    .quad (i << 21) | 0x87
    .endif
    .set i, i + 1
    .endr

    .section .bss.boot, "aw", @nobits
    .balign 4096
idt:
    .zero 4096
kstacks:
    .zero MAX_CPUS << KSTACK_SHIFT
ustacks:
    .zero MAX_CPUS << USTACK_SHIFT
    .balign 128
tss_area:
    .zero MAX_CPUS * 128
    .balign 64
    .globl kvmclock_area
kvmclock_area:
    .zero 64
"#,
    options(att_syntax)
);
