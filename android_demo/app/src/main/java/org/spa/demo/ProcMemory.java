package org.spa.demo;

import java.io.BufferedReader;
import java.io.FileReader;
import java.io.FileWriter;
import java.io.IOException;

/**
 * Process memory from Linux's /proc/self: resident set now (VmRSS) and its peak
 * (VmHWM). The peak can be reset by writing "5" to /proc/self/clear_refs
 * (Linux 4.0+); where that is refused, peaks are process-wide since start.
 */
final class ProcMemory {
    private ProcMemory() {}

    /** Reset the peak resident set; false if the kernel refused. */
    static boolean resetPeak() {
        try {
            FileWriter w = new FileWriter("/proc/self/clear_refs");
            try {
                w.write("5");
            } finally {
                w.close();
            }
            return true;
        } catch (IOException e) {
            return false;
        }
    }

    static long rssKb() {
        return statusKb("VmRSS:");
    }

    static long peakRssKb() {
        return statusKb("VmHWM:");
    }

    /** A "Name:   1234 kB" line of /proc/self/status, or -1. */
    private static long statusKb(String name) {
        try {
            BufferedReader r = new BufferedReader(new FileReader("/proc/self/status"));
            try {
                String line;
                while ((line = r.readLine()) != null) {
                    if (line.startsWith(name)) return Long.parseLong(line.substring(name.length()).replace("kB", "").trim());
                }
            } finally {
                r.close();
            }
        } catch (IOException | NumberFormatException e) {
            return -1;
        }
        return -1;
    }
}
